"""The listing stage of every job: a source folder → records, failures, and what a resume must match.

Why a seam of its own: the index job (local or Ray), fine-tuning and ``predict`` all start by listing
a source, and the listing decides things the store must remember — the de-identification key's
fingerprint for DICOM, the keyed references that replace paths, the link file that maps them back
(kept by the data owner, outside the store). The job calls :func:`list_source` and never needs to
know which reader ran; it reports a decode failure with :func:`failure_for`, which keeps the real
path out of the store for de-identified records.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_embed.atomicio import write_bytes_atomic
from cxr_embed.errors import ConfigError, StoreIdentityError
from cxr_embed.readers import reader_for, resolve_source
from cxr_embed.records import ImageRecord, ReadFailure

IDENTITY_KEY = "id_key_fingerprint"
# Failure stages that are a decision about an input rather than a fault in it (the summary's "skipped").
SKIP_STAGES = ("out_of_scope", "duplicate", "not_dicom", "symlink", "special_file", "unlisted")
_STORE_MARKERS = ("store.json", ".lock", "cache")


@dataclass
class Listing:
    """What :func:`list_source` found.

    ``records``: the images to consider, in a deterministic order (row_ids follow it).
    ``failures``: listed inputs that cannot be used (stage + reason; they go to ``errors.parquet``).
    ``identity``: values a store made from this source must keep across resumes (e.g.
    ``{"id_key_fingerprint": "…"}`` for DICOM); the writer refuses a resume whose identity differs.
    ``link_file``: where the mapping from stored references back to files was written, if anywhere.
    ``headers_read`` / ``headers_cached``: DICOM headers parsed now vs reused from the store's cache.
    """

    records: list[ImageRecord]
    failures: list[ReadFailure] = field(default_factory=list)
    identity: dict[str, str] = field(default_factory=dict)
    link_file: Path | None = None
    dataset: str = "auto"
    headers_read: int = 0
    headers_cached: int = 0

    @property
    def listed(self) -> int:
        """Inputs seen: each one ends up in the store or in ``errors.parquet`` (``listed = stored + failed + skipped``)."""
        return len({r.stored_path or r.path for r in self.records}) + len(self.failures)

    def skipped(self) -> dict[str, int]:
        """Failures that are decisions (out of scope, duplicate, …) by stage; the rest are faults."""
        return dict(Counter(f.stage for f in self.failures if f.stage in SKIP_STAGES))


def list_source(
    source: str | Path,
    dataset: str = "auto",
    *,
    options: dict[str, Any] | None = None,
    cache_dir: Path | None = None,
    link_file: Path | None = None,
    progress: bool = False,
) -> Listing:
    """List ``source`` with the reader for ``dataset`` (``options`` are the reader's options).

    ``cache_dir``: a folder the listing may use to skip re-reading unchanged files on a resume (the
    store passes ``<store>/cache``; it never holds identifiers). ``link_file``: where to write
    stored-reference → file mappings when the reader replaces paths (merged with what the file
    already holds; it must lie outside the store).
    """
    options = dict(options or {})
    root, kind = resolve_source(source, dataset, options)
    if kind != "dicom":
        failures: list[ReadFailure] = []
        records = reader_for(kind)(root, errors=failures, **options)
        return Listing(records=records, failures=failures, dataset=kind)
    from cxr_embed.readers.deid import load_key
    from cxr_embed.readers.dicom import list_dicom

    key = load_key(options.pop("key_file", None))
    store_dir = cache_dir.parent if cache_dir is not None else None
    if store_dir is not None:
        _check_store_key(store_dir, key.fingerprint)  # before any model loads, and before caching
    if link_file is not None and cache_dir is not None and _inside(Path(link_file), cache_dir.parent):
        raise ConfigError(f"--link-file {link_file} is inside the store: it maps pseudonyms back to files, so it "
                          "must stay with the data owner, outside the store. Choose another path.")  # fmt: skip
    usable_cache = cache_dir if cache_dir is not None and _is_store_dir(cache_dir.parent) else None
    found = list_dicom(root, key=key, cache_dir=usable_cache, progress=progress, **options)
    written = write_link_file(Path(link_file), found.links) if link_file is not None else None
    return Listing(records=found.records, failures=found.failures, identity={IDENTITY_KEY: found.key.fingerprint},
                   link_file=written, dataset=kind, headers_read=found.stats.read,
                   headers_cached=found.stats.cached)  # fmt: skip


def accounting(listed: int, stored: int, failures_by_stage: dict[str, int]) -> dict[str, Any]:
    """A run's ``listed = stored + failed + skipped(reason)`` (what a summary states; see :data:`SKIP_STAGES`).

    ``listed``: :attr:`Listing.listed`; ``stored``: listed inputs the store holds after the run
    (already stored + embedded); ``failures_by_stage``: every failure of the run, listing included.
    ``balanced`` is False when an input went missing, which must never happen.
    """
    skipped = {stage: n for stage, n in sorted(failures_by_stage.items()) if stage in SKIP_STAGES}
    failed = sum(n for stage, n in failures_by_stage.items() if stage not in SKIP_STAGES)
    balanced = listed == stored + failed + sum(skipped.values())
    return {"listed": listed, "stored": stored, "failed": failed, "skipped": skipped, "balanced": balanced}


def failure_for(record: ImageRecord, stage: str, reason: str) -> ReadFailure:
    """A failure of ``record`` after listing (decode, preprocess, encode) that names no real path.

    De-identified records (``stored_path`` set) are named by their reference, and the real path is
    scrubbed from the reason (decoder messages start with it).
    """
    if record.stored_path is None:
        return ReadFailure(record.image_id, record.path, stage, reason)
    return ReadFailure(
        record.image_id, record.stored_path, stage, reason.replace(record.path, record.stored_path)
    )


def write_link_file(path: Path, links: dict[str, Path]) -> Path:
    """Write (merge) ``reference,path`` rows to ``path``, mode 0600 (it re-identifies every file).

    Paths are written byte for byte (surrogate-escaped names round-trip), so every file is found
    again, whatever its name.
    """
    merged = dict(read_link_file(path)) if path.exists() else {}
    merged.update({ref: os.fsdecode(os.fspath(p)) for ref, p in links.items()})
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["reference", "path"])
    writer.writerows(sorted(merged.items()))
    return write_bytes_atomic(buf.getvalue().encode("utf-8", "surrogateescape"), path, mode=0o600)


def read_link_file(path: Path) -> dict[str, Path]:
    """reference -> file, as written by :func:`write_link_file`."""
    text = Path(path).read_bytes().decode("utf-8", "surrogateescape")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    return {ref: Path(p) for ref, p in rows[1:] if ref}


def _check_store_key(store_dir: Path, fingerprint: str) -> None:
    """Refuse early when ``store_dir`` is a store made with another key (the writer checks again, under its lock)."""
    try:
        manifest = json.loads((store_dir / "store.json").read_text())
    except (OSError, ValueError):
        return  # no store yet, or one the writer will report on
    recorded = (manifest.get("identity") or {}).get(IDENTITY_KEY) if isinstance(manifest, dict) else None
    if recorded != fingerprint:
        raise StoreIdentityError.for_key(store_dir, recorded, fingerprint)


def _inside(path: Path, folder: Path) -> bool:
    p, f = path.expanduser().resolve(), folder.expanduser().resolve()
    return p == f or f in p.parents


def _is_store_dir(folder: Path) -> bool:
    """Cache only in a store, or in a folder that will become one (missing or empty), never elsewhere."""
    if not folder.exists():
        return True
    names = {p.name for p in folder.iterdir()}
    return not names - set(_STORE_MARKERS) - {"embeddings"} or "store.json" in names
