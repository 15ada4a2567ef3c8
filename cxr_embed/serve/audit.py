"""The audit trail of ``cxr-embed serve``: one row per API call in the store's ``audit`` table.

Rows go to ``<store>/results/audit/part-*.parquet`` through :meth:`Store.write_results`: each part is
written atomically, then recorded with its sha256 in ``store.json`` under the store's short manifest
lock (so ``store validate`` checks it and a damaged part is reported, not read), and never
rewritten: the table is append-only. ``Store.connect`` exposes it to ``cxr-embed sql`` as the view
``audit``. This is the only thing the server writes into a store.

What a row holds (:data:`cxr_embed.schema.AUDIT_SCHEMA`): time, key id, endpoint,
HTTP status, input kind / count / bytes, model id and checkpoint checksum, classifier name, run and
checksum, thresholds, the decision(s), how many inputs abstained, latency and an error kind. Never
an identifier, a file name, a pseudonym or a pixel: an auditor learns who asked what kind of
question and what the service answered, not about whom.

Rows are buffered and written every ``flush_seconds`` (and when ``flush_rows`` are waiting, and at
shutdown), so a busy server writes a few parts a second rather than one per call; a crash loses at
most the last interval's rows.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import pyarrow as pa

from cxr_embed.schema import AUDIT_SCHEMA

if TYPE_CHECKING:
    from cxr_embed.store import Store

AUDIT_TABLE = "audit"


@dataclass
class AuditRecord:
    """One API call. Handlers fill the input/decision fields; the middleware the rest."""

    endpoint: str
    key_id: str | None = None
    status: int = 0
    input_kind: str | None = None
    inputs: int = 0
    input_bytes: int = 0
    model_id: str | None = None
    checkpoint_sha256: str | None = None
    classifier: str | None = None
    classifier_run: str | None = None
    classifier_sha256: str | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    decision: str | None = None
    abstained: int = 0
    latency_ms: float = 0.0
    error: str | None = None
    time: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    def row(self) -> dict:
        out = asdict(self)
        out["thresholds"] = json.dumps(self.thresholds, sort_keys=True) if self.thresholds else None
        return out


class AuditLog:
    """Thread-safe buffer of :class:`AuditRecord` flushed into the store's audit table."""

    def __init__(self, store: Store, flush_rows: int = 256):
        self.store = store
        self.flush_rows = flush_rows
        self._pending: list[AuditRecord] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self.written = 0

    def append(self, record: AuditRecord) -> bool:
        """Queue ``record``; True when enough rows wait that the caller should :meth:`flush` now."""
        with self._lock:
            self._pending.append(record)
            return len(self._pending) >= self.flush_rows

    def flush(self) -> int:
        """Write every queued row as one new recorded part; returns how many were written."""
        with self._write_lock:
            with self._lock:
                rows, self._pending = self._pending, []
            if not rows:
                return 0
            table = pa.Table.from_pylist([r.row() for r in rows], schema=AUDIT_SCHEMA)
            self.store.write_results(AUDIT_TABLE, table)
            self.written += len(rows)
            return len(rows)
