"""The write side: :class:`StoreLock` and :class:`StoreWriter`, the one way rows get into a store.

Why a manifest: a file only *exists* for readers once ``store.json`` names it (with its size and
sha256). A new shard, errors file or index is written under a new name (temp file, fsync, rename),
and only then is the manifest replaced (temp + fsync + rename); superseded files are deleted after
that. A process killed at any instant therefore leaves the old or the new manifest, plus at most
orphans the next writer deletes. Readers never see half a file, and a rerun resumes from exactly the
committed rows.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from cxr_embed import indexes
from cxr_embed.atomicio import write_bytes_atomic
from cxr_embed.errors import StoreDamagedError, StoreError, StoreIdentityError, StoreMismatchError
from cxr_embed.records import ImageRecord, ReadFailure
from cxr_embed.schema import ERRORS_SCHEMA
from cxr_embed.store.layout import (
    CACHE_DIR,
    EMBEDDINGS_DIR,
    INDEX_DIR,
    LOCK_FILE,
    MANIFEST,
    MANIFEST_LOCK,
    RESULTS_DIR,
    commit_manifest,
    file_entry,
    local_store_path,
    new_manifest,
    read_manifest,
    read_verified,
    referenced_files,
    token,
)
from cxr_embed.store.lock import StoreLock
from cxr_embed.store.reader import Store
from cxr_embed.store.tables import metadata_table, shard_bytes, shard_table

if TYPE_CHECKING:
    import faiss

_RESULT_ORPHAN_AGE_S = 600
"""A result part not in the manifest may be a classify run between its write and its commit (ms);
one older than this was left by a killed run and is deleted."""


@dataclasses.dataclass
class ReconcileResult:
    """What :meth:`StoreWriter.reconcile` did: metadata updated in place, rows gone from the source."""

    updated: int = 0
    missing_from_source: int = 0
    pruned: int = 0


class StoreWriter:
    """The single writer of a store: lock, resume, append shards atomically, record failures, index.

    Usage (the index job; the Ray engine does the same from its driver)::

        with StoreWriter(dir, model_id=..., checkpoint_sha256=..., preprocess_fingerprint=..., dim=...) as w:
            todo = w.pending(records)            # records whose image_id is not stored yet
            w.reconcile(records)                 # metadata edits in the source -> new shard versions
            w.record_failures(reader_failures)
            for recs, emb in batches(todo):      # any grouping; one call == one committed shard
                w.append(recs, emb)
            store = w.finalize()                 # build / grow the FAISS index, return the open Store

    Entering takes the :class:`StoreLock` (or uses ``lock``, already held by the caller) and deletes
    orphans (files a killed run renamed into place but never committed, temp files). Damaged parts
    found on entering are repaired where that is sound: a damaged index or errors file is dropped
    (rebuilt at finalize), a damaged shard is dropped so its images are embedded again from the source.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        model_id: str,
        checkpoint_sha256: str,
        preprocess_fingerprint: str,
        dim: int,
        index_kind: str | None = None,
        model_dir: str | Path | None = None,
        lock: StoreLock | None = None,
        identity: dict[str, str] | None = None,
    ):
        self.path = local_store_path(path)
        self.source_identity = dict(identity or {})  # e.g. the DICOM key fingerprint; kept across resumes
        self.identity = {
            "model_id": model_id,
            "checkpoint_sha256": checkpoint_sha256,
            "preprocess_fingerprint": preprocess_fingerprint,
        }
        self.dim = int(dim)
        if index_kind is not None:
            indexes.resolve_kind(index_kind, 0)  # refuse a bad kind before any work
        self.index_kind = index_kind
        self.model_dir = str(Path(model_dir).expanduser().resolve()) if model_dir is not None else None
        self.store: Store | None = None
        self._lock = lock or StoreLock(self.path)
        self._own_lock = lock is None
        self._stored: set[str] = set()
        self._attempted: set[str] = set()
        self._new_failures: list[dict[str, Any]] = []
        self._failures_dirty = False
        self._superseded: list[str] = []
        self._run_at = datetime.now(timezone.utc)
        self.rows_added = 0
        self.repairs: list[str] = []
        self.reconciled = ReconcileResult()

    @classmethod
    def maintain(cls, path: str | Path) -> StoreWriter:
        """A writer with the store's own identity, for maintenance (delete, compact, migrate-free edits)."""
        root = local_store_path(path)
        manifest = read_manifest(root)
        return cls(
            root,
            model_id=manifest["model_id"],
            checkpoint_sha256=manifest["checkpoint_sha256"],
            preprocess_fingerprint=manifest["preprocess_fingerprint"],
            dim=manifest["dim"],
        )

    # -- lifecycle

    def __enter__(self) -> StoreWriter:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> Store:
        """Lock the store, create or resume it, check identity, repair what can be, delete orphans."""
        if self._own_lock:
            self._lock.acquire()
        elif not self._lock.held or self._lock.path != self.path:
            raise StoreError(f"StoreWriter({self.path}) was given a lock that is not held on that store.")
        try:
            if (self.path / MANIFEST).exists() or (self.path / MANIFEST).is_symlink():
                store = Store(self.path, read_manifest(self.path))
                store.check_compatible(**self.identity)
                if store.dim != self.dim:
                    raise StoreMismatchError(
                        f"Store {self.path} holds {store.dim}-dim embeddings, the model makes {self.dim}-dim ones."
                    )
                self.store = store
                self._repair()
            else:
                self._create()
            _check_source_identity(self._require_open(), self.source_identity)
            self._remove_orphans()
            self._stored = set(self._require_open().metadata(["image_id"]).column("image_id").to_pylist())
        except BaseException:
            self.close()
            raise
        return self._require_open()

    def close(self) -> None:
        """Release the lock if this writer took it. Committed shards stay; an unfinished index is rebuilt next time."""
        if self._own_lock:
            self._lock.release()

    def _create(self) -> None:
        leftovers = [
            p.name
            for p in self.path.iterdir()
            if p.name not in (LOCK_FILE, MANIFEST_LOCK, EMBEDDINGS_DIR, CACHE_DIR)
        ]
        if leftovers:
            raise StoreError(
                f"{self.path} is not empty and is not a cxr-embed store (found {', '.join(sorted(leftovers)[:3])}). "
                "Choose a new or empty directory for --store."
            )
        manifest = new_manifest(dim=self.dim, model_dir=self.model_dir, **self.identity)
        if self.source_identity:
            manifest["identity"] = self.source_identity
        self._commit(manifest)

    def _repair(self) -> None:
        """Drop damaged parts a rerun can rebuild: index, errors file, shards (their images are re-embedded)."""
        store = self._require_open()
        store_check = store.check_layout
        manifest = copy.deepcopy(store.manifest)
        try:
            store_check()
            return
        except StoreDamagedError:
            pass
        changed = False
        for key, what in (("index", "index"), ("errors_file", "errors file")):
            entry = manifest.get(key)
            if entry and entry.get("file"):
                try:
                    read_verified(self.path, entry, what, parquet=key != "index")
                except StoreDamagedError as exc:
                    self.repairs.append(f"{what} {entry['file']} dropped: {exc}")
                    manifest[key], changed = None, True
        bad = set()
        for i, _shard in enumerate(manifest["shards"]):
            try:
                store.shard_table(i, ["row_id"])
            except StoreDamagedError:
                bad.add(i)
        if changed:
            self._commit(manifest)
        if bad:
            from cxr_embed.store.rewrite import remove_rows

            removed = remove_rows(self, set(), drop_shards=bad, action="repair", condition="damaged shards")
            self.repairs.append(
                f"{len(bad)} damaged shard(s) dropped ({removed} rows); their images are embedded again"
            )
        self._require_open().check_layout()  # what cannot be repaired (edited counts) is still refused

    def _remove_orphans(self) -> None:
        manifest = self._require_open().manifest
        keep = referenced_files(manifest)
        for rel in manifest.get("superseded", []):
            if rel not in keep and _inside(self.path, rel):
                (self.path / rel).unlink(missing_ok=True)
        candidates = [
            *(self.path / EMBEDDINGS_DIR).glob("*.parquet*"),
            *(self.path / INDEX_DIR).glob("*"),
            *self.path.glob("errors*.parquet"),
        ]
        for p in candidates:
            if p.is_file() and str(p.relative_to(self.path)) not in keep:
                p.unlink()
        now = time.time()
        for p in (self.path / RESULTS_DIR).glob("*/*.parquet"):
            if str(p.relative_to(self.path)) not in keep and now - p.stat().st_mtime > _RESULT_ORPHAN_AGE_S:
                p.unlink()
        for folder in (self.path, self.path / INDEX_DIR, self.path / EMBEDDINGS_DIR):
            for tmp in folder.glob(".*.tmp-*"):
                tmp.unlink()

    def _require_open(self) -> Store:
        if self.store is None or not self._lock.held:
            raise StoreError(
                "StoreWriter is not open: use it as a context manager (`with StoreWriter(...) as w:`)."
            )
        return self.store

    def manifest_copy(self) -> dict[str, Any]:
        """A deep copy of the current manifest, to edit and pass to :meth:`commit`."""
        return copy.deepcopy(self._require_open().manifest)

    def new_shard_name(self, manifest: dict[str, Any]) -> str:
        """The next unused shard file name (a counter in the manifest: names are never reused)."""
        n = int(manifest.get("next_part", len(manifest["shards"])))
        manifest["next_part"] = n + 1
        return f"{EMBEDDINGS_DIR}/part-{n:05d}.parquet"

    def supersede(self, *files: str) -> None:
        """Files to delete once the next manifest commit no longer names them."""
        self._superseded.extend(files)

    def commit(
        self, manifest: dict[str, Any], *, results_from_disk: bool = True, locked: bool = False
    ) -> Store:
        """Replace store.json, then delete superseded files; returns the new (unchecked) Store."""
        return self._commit(manifest, results_from_disk=results_from_disk, locked=locked)

    def _commit(
        self, manifest: dict[str, Any], *, results_from_disk: bool = True, locked: bool = False
    ) -> Store:
        if self.model_dir is not None:
            manifest["model_dir"] = self.model_dir  # the folder may have moved; same checksum, new place
        manifest["counts"]["shards"] = len(manifest["shards"])
        keep = referenced_files(manifest)
        # recorded in the commit itself, so a writer killed right after it still gets them deleted
        # by the next one (a delete's superseded files hold the erased rows)
        manifest["superseded"] = sorted({rel for rel in self._superseded if rel not in keep})
        commit_manifest(self.path, manifest, results_from_disk=results_from_disk, locked=locked)
        self.store = Store(self.path, manifest)
        for rel in manifest["superseded"]:
            (self.path / rel).unlink(missing_ok=True)
        self._superseded = []
        return self.store

    # -- rows

    def pending(self, records: Iterable[ImageRecord]) -> list[ImageRecord]:
        """``records`` whose image_id is not stored yet (first occurrence of each id, input order)."""
        self._require_open()
        out, seen = [], set()
        for rec in records:
            if rec.image_id in self._stored or rec.image_id in seen:
                continue
            seen.add(rec.image_id)
            out.append(rec)
        self._attempted |= seen
        return out

    def append(
        self, records: Sequence[ImageRecord] | pa.Table | Sequence[dict[str, Any]], embeddings: np.ndarray
    ) -> int:
        """Commit ``records`` with their ``embeddings`` as one new shard; returns the first row_id given.

        Row ids continue densely from the store's current length. Raises StoreError on a shape
        mismatch, a non-finite vector or an image_id that is already stored.
        """
        store = self._require_open()
        meta = metadata_table(records)
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape != (meta.num_rows, self.dim):
            raise StoreError(
                f"append: got embeddings of shape {emb.shape} for {meta.num_rows} records of dim {self.dim}."
            )
        if not np.isfinite(emb).all():
            raise StoreError("append: embeddings contain NaN/inf; record those inputs as failures instead.")
        ids = meta.column("image_id").to_pylist()
        dupes = (set(ids) & self._stored) | {i for i, c in Counter(ids).items() if c > 1}
        if None in ids or dupes:
            raise StoreError(
                f"append: image_ids must be unique and not yet stored (offending: {sorted(map(str, dupes))[:5]})."
            )
        if not ids:
            return len(store)
        first = len(store)
        manifest = self.manifest_copy()
        rel = self.new_shard_name(manifest)
        data = shard_bytes(shard_table(meta, emb, first, self.identity))
        write_bytes_atomic(data, self.path / rel)
        manifest["shards"].append({**file_entry(rel, data), "rows": len(ids), "first_row_id": first})
        manifest["counts"]["rows"] = first + len(ids)
        self._stored.update(ids)
        self.rows_added += len(ids)
        self._flush_failures(manifest)
        self._commit(manifest)
        return first

    def reconcile(
        self, records: Sequence[ImageRecord], *, prune: bool = False, complete: bool = True
    ) -> ReconcileResult:
        """Bring stored metadata in line with the source listing ``records``, without re-embedding.

        Rows whose metadata differs (label, findings, split, patient, path, any reader column) get a
        new version of their shard, committed atomically; embeddings are copied bit for bit. Stored
        images absent from ``records`` are counted (``missing_from_source``) and removed only when
        ``prune``; ``complete=False`` (a ``--limit`` run, which lists only part of the source) counts
        nothing as missing.
        """
        from cxr_embed.store.rewrite import changed_metadata, remove_rows, update_metadata

        self._require_open()
        listed = {}
        for rec in records:
            listed.setdefault(rec.image_id, rec)
        updates = changed_metadata(self._require_open(), listed)
        result = ReconcileResult(updated=update_metadata(self, updates) if updates else 0)
        if complete:
            missing = self._stored - set(listed)
            result.missing_from_source = len(missing)
            if prune and missing:
                result.pruned = remove_rows(self, missing, action="prune", condition="missing from source")
        self.reconciled = result
        return result

    def record_failures(self, failures: Iterable[ReadFailure]) -> None:
        """Remember failed inputs; written to the errors file with the next shard or at finalize."""
        self._require_open()
        for f in failures:
            self._new_failures.append(
                {"image_id": f.image_id, "path": f.path, "stage": f.stage, "reason": f.reason}
            )
            self._failures_dirty = True

    def finalize(self) -> Store:
        """Write pending failures, build or grow the FAISS index, return the verified open Store."""
        store = self._require_open()
        manifest = self.manifest_copy()
        self._flush_failures(manifest)
        requested = self.index_kind or (manifest.get("index") or {}).get("requested") or "auto"
        self.update_index(manifest, store, requested)
        self._commit(manifest)
        return Store.open(self.path)

    # -- internals

    def _flush_failures(self, manifest: dict[str, Any]) -> None:
        """errors := this run's failures + older ones for inputs this run did not touch.

        So the file always describes the latest attempt at each input: a rerun that fixes a file
        drops its old error, and a kill + rerun ends with the same errors as one clean run.
        """
        old = self._require_open().errors()
        retried = {f["image_id"] for f in self._new_failures}
        keep = [
            i not in self._stored and i not in self._attempted and i not in retried
            for i in old.column("image_id").to_pylist()
        ]  # O(errors), not O(store)
        kept = old.filter(pa.array(keep, pa.bool_()))
        manifest["counts"]["errors"] = kept.num_rows + len(self._new_failures)
        if not self._failures_dirty and manifest["counts"]["errors"] == old.num_rows:
            return  # nothing new, nothing pruned: the file is already right
        new = pa.Table.from_pylist(
            [{**f, "run_at": self._run_at} for f in self._new_failures], schema=ERRORS_SCHEMA
        )
        self.set_errors(manifest, pa.concat_tables([kept, new]))
        self._failures_dirty = False

    def set_errors(self, manifest: dict[str, Any], errors: pa.Table) -> None:
        """Write ``errors`` as a new errors file and point ``manifest`` at it (old one superseded)."""
        old = manifest.get("errors_file")
        rel = f"errors-{token()}.parquet"
        data = shard_bytes(errors.cast(ERRORS_SCHEMA))
        write_bytes_atomic(data, self.path / rel)
        manifest["errors_file"] = file_entry(rel, data)
        manifest["counts"]["errors"] = errors.num_rows
        if old:
            self.supersede(old["file"])

    def update_index(
        self,
        manifest: dict[str, Any],
        store: Store,
        requested: str,
        *,
        rebuild: bool = False,
        embeddings: np.ndarray | None = None,
    ) -> None:
        """Grow the committed index with the rows it lacks, or rebuild it when that is not sound.

        ``manifest`` gets the new index entry; ``store`` must hold the rows ``manifest`` describes.
        """
        n = int(manifest["counts"]["rows"])
        old = manifest.get("index")
        index = None
        if old and old.get("file") and not rebuild:
            info = indexes.IndexInfo(
                **{k: old[k] for k in (f.name for f in dataclasses.fields(indexes.IndexInfo)) if k in old}
            )
            if not indexes.needs_rebuild(info, requested, n):
                index = _try_read_index(self.path, old)
        if index is None:
            emb = store.embeddings() if embeddings is None else embeddings
            index, info = indexes.build_index(emb, np.arange(n), requested)
        elif index.ntotal < n:
            start = int(index.ntotal)
            info = indexes.add_to_index(index, info, _embeddings_from(store, start), np.arange(start, n))
        else:
            return
        data = indexes.index_to_bytes(index)
        rel = f"{INDEX_DIR}/faiss-{token()}.index"
        write_bytes_atomic(data, self.path / rel)
        manifest["index"] = {"requested": requested, **dataclasses.asdict(info), **file_entry(rel, data)}
        if old and old.get("file"):
            self.supersede(old["file"])


def _inside(root: Path, rel: str) -> bool:
    """Whether ``rel`` names a file inside the store (an edited store.json must not make a writer delete elsewhere)."""
    return isinstance(rel, str) and not Path(rel).is_absolute() and ".." not in Path(rel).parts and bool(rel)


def _try_read_index(root: Path, entry: dict[str, Any]) -> faiss.Index | None:
    """The committed index if it is intact and holds ids 0..ntotal-1; None means "rebuild it"."""
    try:
        index = indexes.index_from_bytes(read_verified(root, entry, "index", parquet=False))
    except StoreError:
        return None
    ok = np.array_equal(indexes.index_ids(index), np.arange(index.ntotal))
    return index if ok else None


def _embeddings_from(store: Store, start: int) -> np.ndarray:
    """Embeddings of rows ``start..N-1``, reading only the shards that hold them."""
    from cxr_embed.store.tables import embedding_matrix

    parts = []
    for i, shard in enumerate(store.manifest["shards"]):
        end = shard["first_row_id"] + shard["rows"]
        if end <= start:
            continue
        matrix = embedding_matrix(store.shard_table(i, ["embedding"]).column("embedding"), store.dim)
        parts.append(matrix[max(0, start - shard["first_row_id"]) :])
    return np.concatenate(parts) if parts else np.zeros((0, store.dim), np.float32)


def build_store_from_arrays(
    path: str | Path,
    embeddings: np.ndarray,
    metadata: pa.Table | list[dict],
    *,
    model_id: str = "synthetic",
    checkpoint_sha256: str = "0" * 64,
    preprocess_fingerprint: str = "synthetic",
    index_kind: str = "flat",
    shard_size: int = 4096,
    model_dir: str | Path | None = None,
) -> Store:
    """A store from in-memory arrays, in exactly the format ``cxr-embed index`` writes.

    For tests, benchmarks and synthetic demos. ``metadata`` rows align with ``embeddings`` rows
    and become row_ids 0..N-1; columns not given are null.
    """
    emb = np.asarray(embeddings, dtype=np.float32)
    meta = metadata_table(metadata)
    if emb.ndim != 2 or len(emb) != meta.num_rows:
        raise StoreError(
            f"build_store_from_arrays: {meta.num_rows} metadata rows but embeddings of shape {emb.shape}."
        )
    with StoreWriter(
        path,
        model_id=model_id,
        checkpoint_sha256=checkpoint_sha256,
        preprocess_fingerprint=preprocess_fingerprint,
        dim=emb.shape[1],
        index_kind=index_kind,
        model_dir=model_dir,
    ) as writer:
        for start in range(0, len(emb), shard_size):
            writer.append(meta.slice(start, shard_size), emb[start : start + shard_size])
        return writer.finalize()


def _check_source_identity(store: Store, identity: dict[str, str]) -> None:
    """Refuse a resume/append whose source identity (e.g. de-identification key) differs from the store's."""
    recorded = store.manifest.get("identity") or {}
    if recorded == identity:
        return
    if "id_key_fingerprint" in recorded or "id_key_fingerprint" in identity:
        raise StoreIdentityError.for_key(store.path, recorded.get("id_key_fingerprint"), identity.get("id_key_fingerprint"))
    raise StoreIdentityError(
        f"Store {store.path} was listed with {recorded or 'no source identity'}, this run with "
        f"{identity or 'none'}; index into a new store instead."
    )
