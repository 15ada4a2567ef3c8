"""The embedding store: one directory of Parquet shards, a FAISS index, errors and results.

Layout (see the README's index section)::

    store.json                      manifest: identity (model, checkpoint, preprocessing, dim),
                                    committed shards, counts, index kind — replaced atomically
    embeddings/part-NNNNN.parquet   one shard per commit; row_id dense 0..N-1 across shards
    index/faiss.index, index.json   IndexIDMap2 whose ids are the row_ids
    errors.parquet                  inputs that failed (image_id, path, stage, reason, run_at)
    results/<table>/part-*.parquet  predictions / metrics / runs appended by classify and finetune

Why a manifest: a shard only *exists* for readers once ``store.json`` names it. A shard is written
to a temp file, fsynced and renamed, and only then is the manifest replaced (tmp + fsync + rename).
A process killed at any instant therefore leaves either the old or the new manifest, plus at most
an orphan shard that the next writer deletes. Readers never see half a shard, and a rerun resumes
from exactly the committed rows.

:class:`StoreWriter` is the one way rows get in (the index job and the Ray engine both use it);
:class:`Store` is the read side every consumer uses.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cxr_embed import indexes
from cxr_embed.atomicio import atomic_path, write_json_atomic, write_parquet_atomic
from cxr_embed.errors import ConfigError, StoreError, StoreLockedError, StoreMismatchError
from cxr_embed.records import FINDINGS, ImageRecord, ReadFailure
from cxr_embed.schema import AUDIT_SCHEMA, ERRORS_SCHEMA, IDENTITY_COLUMNS, METADATA_SCHEMA, RESULT_SCHEMAS, shard_schema

if TYPE_CHECKING:
    import duckdb
    import faiss

SCHEMA_VERSION = 1
MANIFEST = "store.json"
LOCK_FILE = ".lock"
EMBEDDINGS_DIR = "embeddings"
INDEX_DIR = "index"
INDEX_FILE = "faiss.index"
INDEX_META = "index.json"
ERRORS_FILE = "errors.parquet"
RESULTS_DIR = "results"
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- tables


def conform(data: pa.Table, schema: pa.Schema, what: str) -> pa.Table:
    """``data`` with exactly ``schema``'s columns and types; StoreError naming what is wrong."""
    missing = [n for n in schema.names if n not in data.column_names]
    extra = [n for n in data.column_names if n not in schema.names]
    if missing or extra:
        raise StoreError(
            f"{what}: columns do not match the store schema (missing: {missing or 'none'}, unexpected: "
            f"{extra or 'none'}). Expected {schema.names}."
        )
    try:
        return data.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise StoreError(f"{what}: a column has the wrong type ({exc}).") from exc


def _record_rows(records: Sequence[ImageRecord]) -> list[dict[str, Any]]:
    rows = []
    for rec in records:
        row = dataclasses.asdict(rec)
        stored = row.pop("stored_path")
        if stored is not None:
            row["path"] = stored
        flags = row.pop("findings")
        row.update({name: (None if flags is None else int(flags[i])) for i, name in enumerate(FINDINGS)})
        rows.append(row)
    return rows


def metadata_table(metadata: pa.Table | Sequence[dict[str, Any]] | Sequence[ImageRecord]) -> pa.Table:
    """Normalise records / dict rows / an Arrow table into :data:`METADATA_SCHEMA` minus ``row_id``.

    Missing columns become nulls; a ``findings`` tuple (as in :class:`ImageRecord`) is spread into
    the 14 finding columns. ``image_id`` is required: it is how reruns know what is stored.
    """
    if not isinstance(metadata, pa.Table):
        rows = list(metadata)
        if rows and isinstance(rows[0], ImageRecord):
            rows = _record_rows(rows)  # type: ignore[arg-type]
        elif any("findings" in r for r in rows):
            rows = _record_rows([ImageRecord(**{k: r.get(k) for k in _RECORD_FIELDS}) for r in rows])
        names = {k for r in rows for k in r}
        metadata = pa.table({k: [r.get(k) for r in rows] for k in sorted(names)}) if rows else pa.table({"image_id": pa.array([], pa.string())})
    n = metadata.num_rows
    if "image_id" not in metadata.column_names:
        raise StoreError("Store metadata needs an `image_id` column (a unique id per image).")
    columns = {}
    for f in METADATA_SCHEMA:
        if f.name == "row_id":
            continue
        col = metadata.column(f.name) if f.name in metadata.column_names else pa.nulls(n, f.type)
        try:
            columns[f.name] = col.cast(f.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise StoreError(f"Store metadata column {f.name!r} cannot be stored as {f.type} ({exc}).") from exc
    return pa.table(columns)


_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(ImageRecord))


def _shard_table(meta: pa.Table, embeddings: np.ndarray, first_row_id: int, identity: dict[str, str]) -> pa.Table:
    n, dim = embeddings.shape
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1))
    columns = {
        "row_id": pa.array(np.arange(first_row_id, first_row_id + n, dtype=np.int64)),
        **{name: meta.column(name) for name in meta.column_names},
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        **{name: pa.array([identity[name]] * n, pa.string()) for name in IDENTITY_COLUMNS},
    }
    return pa.table(columns).cast(shard_schema(dim))


def embedding_matrix(column: pa.ChunkedArray, dim: int) -> np.ndarray:
    """A FixedSizeList<float32>[dim] column as an (n, dim) float32 C-contiguous array."""
    out = np.empty((len(column), dim), dtype=np.float32)
    pos = 0
    for chunk in column.chunks:
        values = chunk.flatten().to_numpy(zero_copy_only=False)
        out[pos : pos + len(chunk)] = values.reshape(len(chunk), dim)
        pos += len(chunk)
    return out


# ----------------------------------------------------------------------------- read side


class Store:
    """A committed store, read-only. Open with :meth:`open`; every consumer goes through this.

    ``Store.open`` proves the parts agree before anyone reads: the manifest's shards exist, their
    ``row_id`` run 0..N-1 densely, and the FAISS index holds exactly those ids.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest
        self.dim: int = int(manifest["dim"])
        self.model_id: str = manifest["model_id"]
        self.checkpoint_sha256: str = manifest["checkpoint_sha256"]
        self.preprocess_fingerprint: str = manifest["preprocess_fingerprint"]
        self._index: faiss.Index | None = None

    # -- construction

    @classmethod
    def open(cls, path: str | Path, *, check_index: bool = True) -> Store:
        """Open a store and check its consistency; ``check_index=False`` skips the FAISS part
        (used by writers resuming a store whose index is not built yet)."""
        root = Path(path).expanduser()
        store = cls(root, read_manifest(root))
        store._check_shards()
        if check_index:
            store._index = store._load_checked_index()
        return store

    @classmethod
    def create(cls, path: str | Path, *, model_id: str, checkpoint_sha256: str, preprocess_fingerprint: str, dim: int) -> Store:
        """Start an empty store in ``path`` (an empty or missing directory)."""
        root = Path(path).expanduser()
        if (root / MANIFEST).exists():
            raise StoreError(f"{root} is already a store. Open it with Store.open (or rerun `cxr-embed index` to add to it).")
        if root.exists() and not root.is_dir():
            raise StoreError(f"{root} is a file, not a directory. Choose a new directory for the store.")
        leftovers = [p.name for p in root.iterdir() if p.name not in (LOCK_FILE, EMBEDDINGS_DIR)] if root.exists() else []
        if leftovers:
            raise StoreError(
                f"{root} is not empty and is not a cxr-embed store (found {', '.join(sorted(leftovers)[:3])}). "
                "Choose a new or empty directory for --store."
            )
        root.mkdir(parents=True, exist_ok=True)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "model_id": model_id,
            "checkpoint_sha256": checkpoint_sha256,
            "preprocess_fingerprint": preprocess_fingerprint,
            "dim": int(dim),
            "counts": {"rows": 0, "errors": 0, "shards": 0},
            "shards": [],
            "index": None,
            "created_at": _now(),
            "updated_at": _now(),
        }
        write_json_atomic(manifest, root / MANIFEST)
        return cls(root, manifest)

    # -- basic facts

    def __len__(self) -> int:
        return int(self.manifest["counts"]["rows"])

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, rows={len(self)}, dim={self.dim}, model_id={self.model_id!r})"

    @property
    def shard_paths(self) -> list[Path]:
        """Committed shard files in row order."""
        return [self.path / s["file"] for s in self.manifest["shards"]]

    @property
    def index_kind(self) -> str | None:
        """Concrete FAISS index kind (``flat``/``ivf``/``hnsw``/``ivfpq``), None before the first build."""
        return (self.manifest.get("index") or {}).get("kind")

    # -- data

    def embeddings(self) -> np.ndarray:
        """All embeddings as one (N, D) float32 C-contiguous array; row i is row_id i."""
        out = np.empty((len(self), self.dim), dtype=np.float32)
        for shard, path in zip(self.manifest["shards"], self.shard_paths, strict=True):
            start = shard["first_row_id"]
            column = pq.read_table(path, columns=["embedding"]).column("embedding")
            out[start : start + shard["rows"]] = embedding_matrix(column, self.dim)
        return out

    def metadata(self, columns: Sequence[str] | None = None) -> pa.Table:
        """Every column but ``embedding`` (or just ``columns``), ordered by row_id."""
        schema = shard_schema(self.dim)
        names = [n for n in schema.names if n != "embedding"] if columns is None else list(columns)
        unknown = [n for n in names if n not in schema.names]
        if unknown:
            raise StoreError(f"Unknown store column(s) {unknown}; available: {[n for n in schema.names]}.")
        if not self.shard_paths:
            return schema.empty_table().select(names)
        return pa.concat_tables([pq.read_table(p, columns=names) for p in self.shard_paths]).select(names)

    def index(self, gpu: bool = False) -> faiss.Index:
        """The FAISS index (``IndexIDMap2``, ids == row_ids), checked on first load and cached.

        ``gpu=True`` returns a GPU copy for searching when faiss-gpu and a CUDA device are present
        (the CPU index otherwise, and always for HNSW, which FAISS cannot run on a GPU).
        """
        if self._index is None:
            self._index = self._load_checked_index()
        return indexes.to_gpu(self._index) if gpu else self._index

    def errors(self) -> pa.Table:
        """``errors.parquet`` (empty table with :data:`ERRORS_SCHEMA` when nothing failed)."""
        path = self.path / ERRORS_FILE
        return pq.read_table(path) if path.exists() else ERRORS_SCHEMA.empty_table()

    def check_compatible(self, model_id: str, checkpoint_sha256: str, preprocess_fingerprint: str) -> None:
        """Refuse to mix embeddings: raise StoreMismatchError unless all three match this store."""
        theirs = {"model_id": model_id, "checkpoint_sha256": checkpoint_sha256, "preprocess_fingerprint": preprocess_fingerprint}
        diffs = [f"{k} {getattr(self, k)!r} (store) vs {v!r} (given)" for k, v in theirs.items() if getattr(self, k) != v]
        if diffs:
            raise StoreMismatchError(
                f"Store {self.path} was made with a different model or preprocessing: {'; '.join(diffs)}. "
                "Embeddings from different models are not comparable: use the model folder the store was "
                "built with, or index into a new --store directory."
            )

    # -- SQL

    def connect(self) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection with views ``images`` (metadata), ``embeddings``
        (row_id, image_id, embedding FLOAT[D]), ``predictions``, ``metrics``, ``runs``, ``errors``.

        Views read the store's files directly (nothing is copied); a table with no data yet is an
        empty view with the right columns, so queries never fail just because classify has not run.
        """
        import duckdb

        con = duckdb.connect(":memory:")
        shards = [str(p.resolve()) for p in self.shard_paths]
        if shards:
            src = f"read_parquet({_sql_list(shards)})"
            con.execute(f"CREATE VIEW images AS SELECT * EXCLUDE (embedding) FROM {src}")
            con.execute(
                f"CREATE VIEW embeddings AS SELECT row_id, image_id, embedding::FLOAT[{self.dim}] AS embedding FROM {src}"
            )
        else:
            meta_schema = shard_schema(self.dim)
            con.execute(f"CREATE VIEW images AS {_empty_select(meta_schema.remove(meta_schema.get_field_index('embedding')))}")
            emb = pa.schema([("row_id", pa.int64()), ("image_id", pa.string()), ("embedding", pa.list_(pa.float32(), self.dim))])
            con.execute(f"CREATE VIEW embeddings AS {_empty_select(emb)}")
        for table, schema in {**RESULT_SCHEMAS, "audit": AUDIT_SCHEMA}.items():  # audit: `cxr-embed serve` calls
            files = self._result_files(table)
            body = f"SELECT * FROM read_parquet({_sql_list([str(f.resolve()) for f in files])})" if files else _empty_select(schema)
            con.execute(f"CREATE VIEW {table} AS {body}")
        errors = self.path / ERRORS_FILE
        body = f"SELECT * FROM read_parquet({_sql_list([str(errors.resolve())])})" if errors.exists() else _empty_select(ERRORS_SCHEMA)
        con.execute(f"CREATE VIEW errors AS {body}")
        return con

    # -- results

    def write_results(self, table: str, data: pa.Table) -> Path:
        """Append ``data`` to ``results/<table>/`` as one new part file (atomic); returns its path.

        ``data`` must have exactly the table's columns (see :data:`RESULT_SCHEMAS`); types are cast.
        """
        schema = self._result_schema(table)
        data = conform(data, schema, f"write_results({table!r})")
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        return write_parquet_atomic(data, self.path / RESULTS_DIR / table / name)

    def read_results(self, table: str) -> pa.Table | None:
        """All parts of ``results/<table>/`` in write order, or None when nothing was written."""
        schema = self._result_schema(table)
        files = self._result_files(table)
        if not files:
            return None
        return pa.concat_tables([pq.read_table(f).cast(schema) for f in files])

    # -- internals

    def _result_schema(self, table: str) -> pa.Schema:
        if table not in RESULT_SCHEMAS:
            raise StoreError(f"Unknown results table {table!r}; use one of {', '.join(RESULT_SCHEMAS)}.")
        return RESULT_SCHEMAS[table]

    def _result_files(self, table: str) -> list[Path]:
        return sorted((self.path / RESULTS_DIR / table).glob("part-*.parquet"))

    def _check_shards(self) -> None:
        expected = 0
        for shard, path in zip(self.manifest["shards"], self.shard_paths, strict=True):
            if not path.exists():
                raise StoreError(
                    f"Store {self.path} lists shard {shard['file']} but the file is missing. The store is damaged: "
                    "restore the file or re-create the store with `cxr-embed index`."
                )
            if shard["first_row_id"] != expected:
                raise StoreError(f"Store {self.path}: shard {shard['file']} starts at row {shard['first_row_id']}, expected {expected}.")
            expected += shard["rows"]
        if expected != len(self):
            raise StoreError(f"Store {self.path}: store.json counts {len(self)} rows but its shards hold {expected}.")

    def row_ids(self) -> np.ndarray:
        """The ``row_id`` column of every shard, concatenated (cheap: one int64 column)."""
        if not self.shard_paths:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([pq.read_table(p, columns=["row_id"]).column("row_id").to_numpy() for p in self.shard_paths])

    def _load_checked_index(self) -> faiss.Index:
        n = len(self)
        path = self.path / INDEX_DIR / INDEX_FILE
        if not self.manifest.get("index") or not path.exists():
            raise StoreError(
                f"Store {self.path} has {n} rows but no FAISS index yet: the last `cxr-embed index` run did not "
                "finish. Rerun the same command to complete it (only missing work is done)."
            )
        index = indexes.read_index(path)
        if index.ntotal != n:
            raise StoreError(
                f"Store {self.path}: the FAISS index holds {index.ntotal} vectors but the Parquet shards hold {n} rows "
                "(an index run was interrupted). Rerun `cxr-embed index` with the same arguments to bring it up to date."
            )
        ids = indexes.index_ids(index)
        parquet_ids = self.row_ids()
        if not (np.array_equal(ids, parquet_ids) and np.array_equal(parquet_ids, np.arange(n))):
            raise StoreError(
                f"Store {self.path}: FAISS ids do not match the Parquet row_ids, so search hits would point at the "
                f"wrong images. Delete {self.path / INDEX_DIR} and rerun `cxr-embed index` to rebuild the index."
            )
        return index


def read_manifest(root: Path) -> dict[str, Any]:
    """``store.json`` parsed and version-checked; StoreError when absent or malformed."""
    path = root / MANIFEST
    if not path.exists():
        raise StoreError(f"{root} is not a cxr-embed store (no {MANIFEST}). Create one with `cxr-embed index SOURCE --store {root}`.")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise StoreError(f"{path} is not valid JSON ({exc}); the store is damaged.") from exc
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise StoreError(f"{path} has schema_version {version!r}; this cxr-embed reads version {SCHEMA_VERSION}. Upgrade cxr-embed or re-create the store.")
    missing = [k for k in ("model_id", "checkpoint_sha256", "preprocess_fingerprint", "dim", "counts", "shards") if k not in manifest]
    if missing:
        raise StoreError(f"{path} lacks {missing}; the store is damaged.")
    return manifest


def _sql_list(paths: Sequence[str]) -> str:
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


def _duck_type(t: pa.DataType) -> str:
    if pa.types.is_fixed_size_list(t):
        return f"{_duck_type(t.value_type)}[{t.list_size}]"
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ" if t.tz else "TIMESTAMP"
    simple = {pa.int64(): "BIGINT", pa.int32(): "INTEGER", pa.int8(): "TINYINT", pa.string(): "VARCHAR",
              pa.float32(): "FLOAT", pa.float64(): "DOUBLE"}
    return simple[t]


def _empty_select(schema: pa.Schema) -> str:
    cols = ", ".join(f'CAST(NULL AS {_duck_type(f.type)}) AS "{f.name}"' for f in schema)
    return f"SELECT {cols} LIMIT 0"


# ----------------------------------------------------------------------------- write side


_HELD_LOCK_FDS: set[int] = set()


def _drop_inherited_locks() -> None:
    """In a forked child (DataLoader workers), close the parent's lock fds without unlocking.

    A flock belongs to the open file description, which fork shares: a decode worker that outlives
    its SIGKILLed parent for a moment would otherwise keep the store locked against the rerun.
    Closing the child's copy leaves the parent's lock intact (LOCK_UN here would release it).
    """
    for fd in _HELD_LOCK_FDS:
        os.close(fd)
    _HELD_LOCK_FDS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def local_store_path(store_dir: str | Path) -> Path:
    """``store_dir`` as a local path; ``file://`` URIs accepted, other schemes refused with advice.

    Every writer (the local job and the Ray driver) goes through StoreWriter, which relies on POSIX semantics
    (``flock``, atomic ``rename``, ``fsync``) that object stores (s3://, gs://, abfs://) lack.
    """
    text = str(store_dir)
    if "://" not in text:
        return Path(text).expanduser()
    uri = urlparse(text)
    if uri.scheme == "file":
        return Path(uri.path)
    raise ConfigError(
        f"--store {text}: a store must be on a POSIX filesystem the driver can lock and rename on (a local disk or "
        f"a shared mount such as NFS/Lustre), not {uri.scheme}://. Write it to a local path and copy it to "
        f"{uri.scheme}:// when done (e.g. `aws s3 sync`); only the driver writes it, so workers do not need it."
    )


class StoreWriter:
    """The single writer of a store: lock, resume, append shards atomically, record failures, index.

    Usage (the index job; the Ray engine does the same from its driver)::

        with StoreWriter(dir, model_id=..., checkpoint_sha256=..., preprocess_fingerprint=..., dim=...) as w:
            todo = w.pending(records)            # records whose image_id is not stored yet
            w.record_failures(reader_failures)
            for recs, emb in batches(todo):      # any grouping; one call == one committed shard
                w.append(recs, emb)
            store = w.finalize()                 # build / grow the FAISS index, return the open Store

    Entering takes an exclusive ``flock`` on ``<store>/.lock``: a second writer gets
    StoreLockedError; the kernel drops the lock when its holder dies (even by SIGKILL), so a lock
    left by a killed run is taken over without manual clean-up (forked children such as DataLoader
    workers drop their inherited copy, so they cannot keep it alive). Entering also deletes orphans
    (shards a killed run renamed into place but never added to the manifest, temp files).
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
    ):
        self.path = local_store_path(path)
        self.identity = {"model_id": model_id, "checkpoint_sha256": checkpoint_sha256, "preprocess_fingerprint": preprocess_fingerprint}
        self.dim = int(dim)
        if index_kind is not None:
            indexes.resolve_kind(index_kind, 0)  # refuse a bad kind before any work
        self.index_kind = index_kind
        self.store: Store | None = None
        self._lock_fd: int | None = None
        self._stored: set[str] = set()
        self._attempted: set[str] = set()
        self._new_failures: list[dict[str, Any]] = []
        self._failures_dirty = False
        self._run_at = datetime.now(timezone.utc)
        self.rows_added = 0

    # -- lifecycle

    def __enter__(self) -> StoreWriter:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> Store:
        """Lock the store, create or resume it, check identity, delete orphans."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            if (self.path / MANIFEST).exists():
                store = Store.open(self.path, check_index=False)
                store.check_compatible(**self.identity)
                if store.dim != self.dim:
                    raise StoreMismatchError(f"Store {self.path} holds {store.dim}-dim embeddings, the model makes {self.dim}-dim ones.")
            else:
                store = Store.create(self.path, dim=self.dim, **self.identity)
            self.store = store
            self._remove_orphans()
            self._stored = set(store.metadata(["image_id"]).column("image_id").to_pylist())
        except BaseException:
            self.close()
            raise
        return store

    def close(self) -> None:
        """Release the lock (idempotent). Committed shards stay; an unfinished index is rebuilt next time."""
        if self._lock_fd is not None:
            _HELD_LOCK_FDS.discard(self._lock_fd)
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _lock(self) -> None:
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise StoreLockedError(
                    f"Store {self.path} is being written by another process (pid {holder}). Wait for it to finish "
                    "or stop it; the lock is released automatically when that process exits."
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd
        _HELD_LOCK_FDS.add(fd)

    def _remove_orphans(self) -> None:
        assert self.store is not None
        committed = {Path(p).name for p in (s["file"] for s in self.store.manifest["shards"])}
        for p in (self.path / EMBEDDINGS_DIR).glob("*.parquet*"):
            if p.name not in committed:
                p.unlink()
        for folder in (self.path, self.path / INDEX_DIR):  # results/ is not ours: classify writes there unlocked
            for tmp in folder.glob(".*.tmp-*"):
                tmp.unlink()

    def _require_open(self) -> Store:
        if self.store is None or self._lock_fd is None:
            raise StoreError("StoreWriter is not open: use it as a context manager (`with StoreWriter(...) as w:`).")
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

    def append(self, records: Sequence[ImageRecord] | pa.Table | Sequence[dict[str, Any]], embeddings: np.ndarray) -> int:
        """Commit ``records`` with their ``embeddings`` as one new shard; returns the first row_id given.

        Row ids continue densely from the store's current length. Raises StoreError on a shape
        mismatch, a non-finite vector or an image_id that is already stored.
        """
        store = self._require_open()
        meta = metadata_table(records)
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape != (meta.num_rows, self.dim):
            raise StoreError(f"append: got embeddings of shape {emb.shape} for {meta.num_rows} records of dim {self.dim}.")
        if not np.isfinite(emb).all():
            raise StoreError("append: embeddings contain NaN/inf; record those inputs as failures instead.")
        ids = meta.column("image_id").to_pylist()
        dupes = (set(ids) & self._stored) | {i for i, c in Counter(ids).items() if c > 1}
        if None in ids or dupes:
            raise StoreError(f"append: image_ids must be unique and not yet stored (offending: {sorted(map(str, dupes))[:5]}).")
        if not ids:
            return len(store)
        first = len(store)
        manifest = json.loads(json.dumps(store.manifest))
        rel = f"{EMBEDDINGS_DIR}/part-{len(manifest['shards']):05d}.parquet"
        write_parquet_atomic(_shard_table(meta, emb, first, self.identity), self.path / rel)
        manifest["shards"].append({"file": rel, "rows": len(ids), "first_row_id": first})
        manifest["counts"]["rows"] = first + len(ids)
        manifest["counts"]["shards"] = len(manifest["shards"])
        self._stored.update(ids)
        self.rows_added += len(ids)
        self._flush_failures(manifest)
        self._write_manifest(manifest)
        return first

    def record_failures(self, failures: Iterable[ReadFailure]) -> None:
        """Remember failed inputs; written to errors.parquet with the next shard or at finalize."""
        self._require_open()
        for f in failures:
            self._new_failures.append({"image_id": f.image_id, "path": f.path, "stage": f.stage, "reason": f.reason})
            self._failures_dirty = True

    def finalize(self) -> Store:
        """Write pending failures, build or grow the FAISS index, return the verified open Store."""
        store = self._require_open()
        manifest = json.loads(json.dumps(store.manifest))
        self._flush_failures(manifest)
        requested = self.index_kind or (manifest.get("index") or {}).get("requested") or "auto"
        info = self._update_index(store, requested)
        manifest["index"] = {"requested": requested, **dataclasses.asdict(info)}
        self._write_manifest(manifest)
        return Store.open(self.path)

    # -- internals

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest["updated_at"] = _now()
        write_json_atomic(manifest, self.path / MANIFEST)
        self.store = Store(self.path, manifest)

    def _flush_failures(self, manifest: dict[str, Any]) -> None:
        """errors.parquet := this run's failures + older ones for inputs this run did not touch.

        So the file always describes the latest attempt at each input: a rerun that fixes a file
        drops its old error, and a kill + rerun ends with the same errors as one clean run.
        """
        path = self.path / ERRORS_FILE
        old = pq.read_table(path).cast(ERRORS_SCHEMA) if path.exists() else ERRORS_SCHEMA.empty_table()
        retried = {f["image_id"] for f in self._new_failures}
        keep = [i not in self._stored and i not in self._attempted and i not in retried
                for i in old.column("image_id").to_pylist()]  # O(errors), not O(store)
        kept = old.filter(pa.array(keep, pa.bool_()))
        manifest["counts"]["errors"] = kept.num_rows + len(self._new_failures)
        if not self._failures_dirty and manifest["counts"]["errors"] == old.num_rows:
            return  # nothing new, nothing pruned: the file is already right
        new = pa.Table.from_pylist([{**f, "run_at": self._run_at} for f in self._new_failures], schema=ERRORS_SCHEMA)
        write_parquet_atomic(pa.concat_tables([kept, new]), path)
        self._failures_dirty = False

    def _update_index(self, store: Store, requested: str) -> indexes.IndexInfo:
        """Grow the saved index with the rows it lacks, or rebuild it when that is not sound."""
        n = len(store)
        index_dir = self.path / INDEX_DIR
        old = store.manifest.get("index")
        index = None
        if old and (index_dir / INDEX_FILE).exists():
            info = indexes.IndexInfo(**{k: v for k, v in old.items() if k != "requested"})
            if not indexes.needs_rebuild(info, requested, n):
                index = _try_read_index(index_dir / INDEX_FILE, info.ntotal)
        if index is None:
            index, info = indexes.build_index(store.embeddings(), np.arange(n), requested)
        elif index.ntotal < n:
            start = int(index.ntotal)
            info = indexes.add_to_index(index, info, _embeddings_from(store, start), np.arange(start, n))
        else:
            return info
        _save_index(index, info, index_dir)
        return info


def _try_read_index(path: Path, expected: int) -> faiss.Index | None:
    """The saved index if it is intact and holds ids 0..expected-1; None means "rebuild it"."""
    try:
        index = indexes.read_index(path)
    except StoreError:
        return None
    ok = index.ntotal == expected and np.array_equal(indexes.index_ids(index), np.arange(expected))
    return index if ok else None


def _embeddings_from(store: Store, start: int) -> np.ndarray:
    """Embeddings of rows ``start..N-1``, reading only the shards that hold them."""
    parts = []
    for shard, path in zip(store.manifest["shards"], store.shard_paths, strict=True):
        end = shard["first_row_id"] + shard["rows"]
        if end <= start:
            continue
        matrix = embedding_matrix(pq.read_table(path, columns=["embedding"]).column("embedding"), store.dim)
        parts.append(matrix[max(0, start - shard["first_row_id"]) :])
    return np.concatenate(parts) if parts else np.zeros((0, store.dim), np.float32)


def _save_index(index: faiss.Index, info: indexes.IndexInfo, index_dir: Path) -> None:
    import faiss

    index_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(index_dir / INDEX_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    write_json_atomic(dataclasses.asdict(info), index_dir / INDEX_META)


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
) -> Store:
    """A store from in-memory arrays, in exactly the format ``cxr-embed index`` writes.

    For tests, benchmarks and synthetic demos. ``metadata`` rows align with ``embeddings`` rows
    and become row_ids 0..N-1; columns not given are null.
    """
    emb = np.asarray(embeddings, dtype=np.float32)
    meta = metadata_table(metadata)
    if emb.ndim != 2 or len(emb) != meta.num_rows:
        raise StoreError(f"build_store_from_arrays: {meta.num_rows} metadata rows but embeddings of shape {emb.shape}.")
    with StoreWriter(path, model_id=model_id, checkpoint_sha256=checkpoint_sha256, preprocess_fingerprint=preprocess_fingerprint,
                     dim=emb.shape[1], index_kind=index_kind) as writer:
        for start in range(0, len(emb), shard_size):
            writer.append(meta.slice(start, shard_size), emb[start : start + shard_size])
        return writer.finalize()


# ----------------------------------------------------------------------------- info / validate


@dataclass
class StoreInfo:
    """What ``cxr-embed store info`` shows."""

    path: str
    model_id: str
    checkpoint_sha256: str
    preprocess_fingerprint: str
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
    created_at: str | None
    updated_at: str | None


def _counts(column: pa.ChunkedArray) -> dict[str, int]:
    vc = pc.value_counts(column).to_pylist() if len(column) else []
    return {("null" if d["values"] is None else str(d["values"])): int(d["counts"]) for d in vc}


def store_info(path: str | Path) -> StoreInfo:
    """Summarise a store without requiring its index to be current (info works mid-run too)."""
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
        dim=store.dim,
        rows=len(store),
        shards=len(store.shard_paths),
        patients=len(pc.unique(meta.column("patient_id")).drop_null()) if len(store) else 0,
        labels=_counts(meta.column("label")),
        splits=_counts(meta.column("split")),
        index_kind=idx.get("kind"),
        index_rows=idx.get("ntotal"),
        index_params=idx.get("params", {}),
        errors=errors.num_rows,
        errors_by_stage=_counts(errors.column("stage")),
        size_mb=round(size / 2**20, 2),
        created_at=store.manifest.get("created_at"),
        updated_at=store.manifest.get("updated_at"),
    )


@dataclass
class Check:
    """One validation check: ``status`` is "ok", "warn" (not corruption) or "fail"."""

    name: str
    status: str
    detail: str


@dataclass
class ValidationReport:
    """What ``cxr-embed store validate`` shows; ``ok`` is False when any check failed."""

    path: str
    rows: int
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    def add(self, name: str, passed: bool, detail: str, *, warn_only: bool = False) -> bool:
        self.checks.append(Check(name, "ok" if passed else ("warn" if warn_only else "fail"), detail))
        return passed


_VALIDATE_CHUNK = 65_536


def validate_store(path: str | Path) -> ValidationReport:
    """Check everything a reader relies on: shards, row_ids, identity, vectors, index agreement.

    Unlike :meth:`Store.open` this never stops at the first problem (except an unreadable
    manifest): it reports every check, so a user sees the whole state of a damaged store.
    Index vectors are compared with the normalised Parquet vectors for every row (exact kinds);
    IVF-PQ codes are lossy, so there the mean cosine between the two is reported instead.
    """
    root = Path(path).expanduser()
    manifest = read_manifest(root)
    store = Store(root, manifest)
    report = ValidationReport(str(root), len(store))
    missing = [s["file"] for s in manifest["shards"] if not (root / s["file"]).exists()]
    if not report.add("shards present", not missing, f"{len(manifest['shards'])} shards" + (f"; missing {missing[:3]}" if missing else "")):
        return report
    try:
        store._check_shards()
        meta = store.metadata(["row_id", "image_id", *IDENTITY_COLUMNS])
    except (StoreError, OSError, pa.ArrowException) as exc:
        report.add("shards readable", False, str(exc))
        return report
    n = len(store)
    row_ids = meta.column("row_id").to_numpy()
    report.add("row_ids dense", np.array_equal(row_ids, np.arange(n)), f"{meta.num_rows} rows, store.json says {n}")
    unique = len(pc.unique(meta.column("image_id")))
    report.add("image_ids unique", unique == meta.num_rows, f"{unique} distinct of {meta.num_rows}")
    wrong = [c for c in IDENTITY_COLUMNS if n and pc.any(pc.not_equal(meta.column(c), manifest[c])).as_py()]
    report.add("one model per store", not wrong, f"model_id {store.model_id}" + (f"; rows disagree on {wrong}" if wrong else ""))
    emb = store.embeddings()
    report.add("embeddings finite", bool(np.isfinite(emb).all()), f"{n} x {store.dim} float32")
    orphans = [p.name for p in (root / EMBEDDINGS_DIR).glob("*.parquet*") if p.name not in {Path(s["file"]).name for s in manifest["shards"]}]
    report.add("no orphan shards", not orphans, f"{len(orphans)} uncommitted file(s) (the next `cxr-embed index` deletes them)", warn_only=True)
    _validate_index(report, store, emb)
    errors = store.errors()
    report.add("errors.parquet", True, f"{errors.num_rows} failed input(s): {_counts(errors.column('stage'))}")
    return report


def _validate_index(report: ValidationReport, store: Store, emb: np.ndarray) -> None:
    path = store.path / INDEX_DIR / INDEX_FILE
    if not report.add("index present", path.exists() and bool(store.manifest.get("index")), str(path)):
        return
    try:
        index = indexes.read_index(path)
    except StoreError as exc:
        report.add("index readable", False, str(exc))
        return
    n = len(store)
    ids = indexes.index_ids(index)
    report.add("index ids == row_ids", len(ids) == n and np.array_equal(ids, np.arange(n)), f"index holds {index.ntotal}, Parquet {n}")
    if len(ids) != n:
        return
    kind = store.index_kind
    expected = indexes.normalized(emb)
    if kind == "ivfpq":
        cos = [float((indexes.reconstruct_rows(index, np.arange(s, min(n, s + _VALIDATE_CHUNK))) * expected[s : s + _VALIDATE_CHUNK]).sum(1).mean())
               for s in range(0, n, _VALIDATE_CHUNK)]
        mean = float(np.mean(cos)) if cos else 1.0
        report.add("index vectors", mean > 0.8, f"PQ codes are lossy: mean cosine {mean:.3f} to the Parquet vectors", warn_only=True)
        return
    worst = 0.0
    for s in range(0, n, _VALIDATE_CHUNK):
        got = indexes.reconstruct_rows(index, np.arange(s, min(n, s + _VALIDATE_CHUNK)))
        worst = max(worst, float(np.abs(got - expected[s : s + _VALIDATE_CHUNK]).max(initial=0.0)))
    report.add("index vectors == Parquet", worst <= 1e-6, f"{kind}: max |diff| {worst:.2e} over {n} rows")
