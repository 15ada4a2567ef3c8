"""``cxr-embed store info``: counts, identity, index and errors of a store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from cxr_embed.store.reader import Store


@dataclass
class StoreInfo:
    """What ``cxr-embed store info`` shows."""

    path: str
    model_id: str
    checkpoint_sha256: str
    preprocess_fingerprint: str
    model_dir: str | None
    dim: int
    rows: int
    shards: int
    patients: int
    labels: dict[str, int]
    splits: dict[str, int]
    index_kind: str | None
    index_rows: int | None
    index_params: dict[str, Any]
    errors: int
    errors_by_stage: dict[str, int]
    size_mb: float
    deletions: int
    created_at: str | None
    updated_at: str | None


def value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    vc = pc.value_counts(column).to_pylist() if len(column) else []
    return {("null" if d["values"] is None else str(d["values"])): int(d["counts"]) for d in vc}


def store_info(path: str | Path) -> StoreInfo:
    """Summarise a store without requiring its index to be built (info works mid-run too).

    Reads (and so verifies) every shard's metadata and the errors file.
    """
    store = Store.open(path, check_index=False)
    meta = store.metadata(["patient_id", "label", "split"])
    errors = store.errors()
    idx = store.manifest.get("index") or {}
    size = sum(p.stat().st_size for p in store.path.rglob("*") if p.is_file())
    return StoreInfo(
        path=str(store.path),
        model_id=store.model_id,
        checkpoint_sha256=store.checkpoint_sha256,
        preprocess_fingerprint=store.preprocess_fingerprint,
        model_dir=store.model_dir,
        dim=store.dim,
        rows=len(store),
        shards=len(store.shard_paths),
        patients=len(pc.unique(meta.column("patient_id")).drop_null()) if len(store) else 0,
        labels=value_counts(meta.column("label")),
        splits=value_counts(meta.column("split")),
        index_kind=idx.get("kind"),
        index_rows=idx.get("ntotal"),
        index_params=idx.get("params", {}),
        errors=errors.num_rows,
        errors_by_stage=value_counts(errors.column("stage")),
        size_mb=round(size / 2**20, 2),
        deletions=sum(1 for a in store.manifest.get("audit", []) if a.get("action") == "delete"),
        created_at=store.manifest.get("created_at"),
        updated_at=store.manifest.get("updated_at"),
    )
