"""The read side of a store: :class:`Store`, which every consumer goes through.

What a reader can trust, and why:

- ``Store.open`` checks the manifest's shape, that shards run densely over row_ids 0..N-1, that the
  row counts agree, and that every file the manifest names exists with its recorded size (a stat per
  file: truncated, emptied or missing files are caught before any command starts work);
- every byte read from a shard, the index, errors or a result table is hashed and compared with the
  sha256 recorded at commit, so a Parquet file that was rewritten outside cxr-embed (permuted
  embeddings, flipped labels) is refused instead of used (the hash runs on the bytes that are read
  anyway; ``benchmarks/store_checksums.py`` measures it);
- the FAISS index holds exactly ids 0..N-1 (checked on load); the Parquet row_ids are the dense ids
  the writer wrote, which the shard checksums prove, so FAISS id == Parquet row_id.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cxr_embed import indexes
from cxr_embed.atomicio import write_bytes_atomic, write_json_atomic
from cxr_embed.errors import StoreDamagedError, StoreError, StoreMismatchError
from cxr_embed.schema import ERRORS_SCHEMA, RESULT_SCHEMAS, shard_schema
from cxr_embed.store.layout import (
    LOCK_FILE,
    MANIFEST,
    MANIFEST_LOCK,
    RESULTS_DIR,
    check_sha256,
    damaged,
    file_entry,
    local_store_path,
    manifest_lock,
    read_checked,
    read_manifest,
    read_verified,
    sha256_bytes,
    stat_check,
    token,
)
from cxr_embed.store.tables import (
    conform,
    embedding_matrix,
    empty_select,
    parse_parquet,
    shard_bytes,
    sql_list,
)

if TYPE_CHECKING:
    import duckdb
    import faiss

_VERIFIED: dict[tuple[str, int, int], str] = {}
"""Files this process already hashed: (path, size, mtime_ns) -> sha256. A later read of an unchanged
file then reads only the columns it needs instead of hashing the whole file again."""


def _cached(path: Path, entry: dict[str, Any]) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return _VERIFIED.get((str(path), st.st_size, st.st_mtime_ns)) == entry["sha256"]


def _remember(path: Path, entry: dict[str, Any]) -> None:
    st = path.stat()
    _VERIFIED[(str(path), st.st_size, st.st_mtime_ns)] = entry["sha256"]


_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxr-embed-sha256")
"""hashlib and Parquet decoding both release the GIL: a shard's hash runs beside its parse."""


def read_table_verified(
    root: Path, entry: dict[str, Any], what: str, columns: Sequence[str] | None = None
) -> pa.Table:
    """A Parquet store file, checksum-verified, parsed; StoreDamagedError naming it when it is not sound."""
    path = root / entry["file"]
    if _cached(path, entry):
        try:
            return pq.read_table(path, columns=list(columns) if columns is not None else None)
        except pa.ArrowException as exc:
            raise damaged(
                root, what, entry["file"], f"unreadable Parquet: {str(exc).splitlines()[0][:160]}"
            ) from None
    data = read_checked(root, entry, what)
    digest = _HASHER.submit(sha256_bytes, data)
    try:
        table = parse_parquet(data, columns)
    except pa.ArrowException as exc:
        check_sha256(root, entry, what, digest.result())  # a valid-looking file that was altered: say so
        raise damaged(
            root, what, entry["file"], f"unreadable Parquet: {str(exc).splitlines()[0][:160]}"
        ) from None
    check_sha256(root, entry, what, digest.result())
    _remember(path, entry)
    return table


def _removals(manifest: dict[str, Any]) -> int:
    """How many row removals (delete, prune, repair) the store has seen: results computed before one are stale."""
    return sum(1 for a in manifest.get("audit", []) if a.get("action") in ("delete", "prune", "repair"))


class Store:
    """A committed store, read-only. Open with :meth:`open`; every consumer goes through this."""

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
        """Open a store and check its consistency; ``check_index=False`` does not load the FAISS
        index (info works on a store whose first index run has not finished)."""
        root = local_store_path(path)
        store = cls(root, read_manifest(root))
        store.check_layout()
        if check_index:
            store._index = store._load_checked_index()
        return store

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

    @property
    def index_path(self) -> Path | None:
        """The committed FAISS index file, None before the first build."""
        entry = self.manifest.get("index") or {}
        return self.path / entry["file"] if entry.get("file") else None

    @property
    def model_dir(self) -> str | None:
        """The model folder the store was indexed with (None when not recorded)."""
        return self.manifest.get("model_dir")

    # -- data

    def shard_table(self, i: int, columns: Sequence[str] | None = None) -> pa.Table:
        """Shard ``i`` (verified), or just ``columns`` of it; StoreDamagedError when it is not sound."""
        shard = self.manifest["shards"][i]
        try:
            table = read_table_verified(self.path, shard, "shard", columns)
        except StoreDamagedError:
            self._raise_if_changed_since_open()
            raise
        if table.num_rows != shard["rows"]:
            raise damaged(
                self.path,
                "shard",
                shard["file"],
                f"{table.num_rows} rows, store.json recorded {shard['rows']}",
            )
        missing = [c for c in (columns or shard_schema(self.dim).names) if c not in table.column_names]
        if missing:
            raise damaged(self.path, "shard", shard["file"], f"columns {missing} are missing")
        return table

    def embeddings(self) -> np.ndarray:
        """All embeddings as one (N, D) float32 C-contiguous array; row i is row_id i."""
        out = np.empty((len(self), self.dim), dtype=np.float32)
        for i, shard in enumerate(self.manifest["shards"]):
            start = shard["first_row_id"]
            column = self.shard_table(i, ["embedding"]).column("embedding")
            try:
                out[start : start + shard["rows"]] = embedding_matrix(column, self.dim)
            except (ValueError, pa.ArrowException):
                raise damaged(
                    self.path, "shard", shard["file"], f"embeddings are not {self.dim}-dim float32"
                ) from None
        return out

    def metadata(self, columns: Sequence[str] | None = None) -> pa.Table:
        """Every column but ``embedding`` (or just ``columns``), ordered by row_id."""
        schema = shard_schema(self.dim)
        names = [n for n in schema.names if n != "embedding"] if columns is None else list(columns)
        unknown = [n for n in names if n not in schema.names]
        if unknown:
            raise StoreError(f"Unknown store column(s) {unknown}; available: {list(schema.names)}.")
        if not self.manifest["shards"]:
            return schema.empty_table().select(names)
        tables = [self.shard_table(i, names) for i in range(len(self.manifest["shards"]))]
        try:
            target = pa.schema([schema.field(n) for n in names])
            return pa.concat_tables([t.select(names).cast(target) for t in tables])
        except (pa.ArrowException, ValueError) as exc:
            raise StoreDamagedError(
                f"Store {self.path}: shard columns do not have the store's types ({exc})."
            ) from None

    def row_ids(self) -> np.ndarray:
        """The ``row_id`` column of every shard, concatenated."""
        if not self.manifest["shards"]:
            return np.zeros(0, dtype=np.int64)
        return self.metadata(["row_id"]).column("row_id").to_numpy()

    def index(self, gpu: bool = False) -> faiss.Index:
        """The FAISS index (``IndexIDMap2``, ids == row_ids), checked on first load and cached.

        ``gpu=True`` returns a GPU copy for searching when faiss-gpu and a CUDA device are present
        (the CPU index otherwise, and always for HNSW, which FAISS cannot run on a GPU).
        """
        if self._index is None:
            self._index = self._load_checked_index()
        return indexes.to_gpu(self._index) if gpu else self._index

    def errors(self) -> pa.Table:
        """The failed inputs (empty table with :data:`ERRORS_SCHEMA` when nothing failed)."""
        entry = self.manifest.get("errors_file")
        if not entry:
            return ERRORS_SCHEMA.empty_table()
        table = read_table_verified(self.path, entry, "errors file")
        try:
            return conform(table, ERRORS_SCHEMA, "errors")
        except StoreError as exc:
            raise damaged(self.path, "errors file", entry["file"], str(exc)) from None

    def check_compatible(self, model_id: str, checkpoint_sha256: str, preprocess_fingerprint: str) -> None:
        """Refuse to mix embeddings: raise StoreMismatchError unless all three match this store."""
        theirs = {
            "model_id": model_id,
            "checkpoint_sha256": checkpoint_sha256,
            "preprocess_fingerprint": preprocess_fingerprint,
        }
        diffs = [
            f"{k} {getattr(self, k)!r} (store) vs {v!r} (given)"
            for k, v in theirs.items()
            if getattr(self, k) != v
        ]
        if diffs:
            folder = f" ({self.model_dir})" if self.model_dir else ""
            raise StoreMismatchError(
                f"Store {self.path} was made with a different model or preprocessing: {'; '.join(diffs)}. "
                "Embeddings from different models are not comparable: use the model folder the store was "
                f"built with{folder}, whose checkpoint has sha256 {self.checkpoint_sha256}, or index into a new "
                "--store directory."
            )

    # -- SQL

    def connect(self) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection with views ``images`` (metadata), ``embeddings``
        (row_id, image_id, embedding FLOAT[D]), ``errors`` and one view per result table
        (``predictions``, ``metrics``, ``runs``, …, ``audit``: see :data:`RESULT_SCHEMAS`).

        Views read the store's files directly (nothing is copied), after every file has been
        checked against its recorded checksum; a table with no data yet is an empty view with the
        right columns, so queries never fail just because classify has not run.
        """
        import duckdb

        self.verify_files()
        con = duckdb.connect(":memory:")
        shards = [str(p.resolve()) for p in self.shard_paths]
        if shards:
            src = f"read_parquet({sql_list(shards)})"
            con.execute(f"CREATE VIEW images AS SELECT * EXCLUDE (embedding) FROM {src}")
            con.execute(
                f"CREATE VIEW embeddings AS SELECT row_id, image_id, embedding::FLOAT[{self.dim}] AS embedding FROM {src}"
            )
        else:
            meta_schema = shard_schema(self.dim)
            con.execute(
                f"CREATE VIEW images AS {empty_select(meta_schema.remove(meta_schema.get_field_index('embedding')))}"
            )
            emb = pa.schema(
                [
                    ("row_id", pa.int64()),
                    ("image_id", pa.string()),
                    ("embedding", pa.list_(pa.float32(), self.dim)),
                ]
            )
            con.execute(f"CREATE VIEW embeddings AS {empty_select(emb)}")
        for table, schema in RESULT_SCHEMAS.items():
            files = [str((self.path / e["file"]).resolve()) for e in self._result_entries(table)]
            body = f"SELECT * FROM read_parquet({sql_list(files)})" if files else empty_select(schema)
            con.execute(f"CREATE VIEW {table} AS {body}")
        errors = self.manifest.get("errors_file")
        body = (
            f"SELECT * FROM read_parquet({sql_list([str((self.path / errors['file']).resolve())])})"
            if errors
            else empty_select(ERRORS_SCHEMA)
        )
        con.execute(f"CREATE VIEW errors AS {body}")
        from cxr_embed.views import register_result_views  # latest_metrics, latest_predictions, study

        register_result_views(con)
        return con

    def verify_files(self) -> None:
        """Hash every shard, errors and result file against the manifest (StoreDamagedError on the first bad one)."""
        for i in range(len(self.manifest["shards"])):
            self.shard_table(i, ["row_id"])
        self.errors()
        for table, schema in RESULT_SCHEMAS.items():
            for entry in self._result_entries(table):
                read_table_verified(self.path, entry, "result file", [schema.names[0]])

    # -- results

    def write_results(self, table: str, data: pa.Table) -> Path:
        """Append ``data`` to ``results/<table>/`` as one new part file and record its sha256; returns its path.

        ``data`` must have exactly the table's columns (see :data:`RESULT_SCHEMAS`); types are cast.
        The part is written first, then recorded in ``store.json`` under the short manifest lock, so
        a kill leaves at most an unrecorded orphan, which no reader sees. A table naming images is
        refused when rows were removed since this Store was opened; one without image ids (``audit``)
        is not, so a long-running server keeps its audit trail across a ``store delete``.
        """
        schema = self._result_schema(table)
        data = conform(data, schema, f"write_results({table!r})")
        rel = f"{RESULTS_DIR}/{table}/part-{time.time_ns():020d}-{token()}.parquet"
        payload = shard_bytes(data)
        write_bytes_atomic(payload, self.path / rel)
        entry = file_entry(rel, payload)
        with manifest_lock(self.path):
            manifest = read_manifest(self.path)
            if "image_id" in schema.names and _removals(manifest) != _removals(self.manifest):
                (self.path / rel).unlink(missing_ok=True)
                raise StoreError(
                    f"Rows of store {self.path} were removed (store delete, --prune or a repair) while this command "
                    "ran, so its results could name erased images or stale row_ids; nothing was written. Run it again."
                )
            manifest.setdefault("results", {}).setdefault(table, []).append(entry)
            write_json_atomic(manifest, self.path / MANIFEST)
        self.manifest.setdefault("results", {}).setdefault(table, []).append(entry)
        return self.path / rel

    def read_results(self, table: str) -> pa.Table | None:
        """All parts of ``table`` in write order (verified), or None when nothing was written."""
        schema = self._result_schema(table)
        entries = self._result_entries(table)
        if not entries:
            return None
        parts = []
        for entry in entries:
            part = read_table_verified(self.path, entry, "result file")
            try:
                parts.append(conform(part, schema, table))
            except StoreError as exc:
                raise damaged(self.path, "result file", entry["file"], str(exc)) from None
        return pa.concat_tables(parts)

    # -- internals

    def _result_schema(self, table: str) -> pa.Schema:
        if table not in RESULT_SCHEMAS:
            raise StoreError(f"Unknown results table {table!r}; use one of {', '.join(RESULT_SCHEMAS)}.")
        return RESULT_SCHEMAS[table]

    def _result_entries(self, table: str) -> list[dict[str, Any]]:
        """The table's recorded parts as of now: result tables grow while a Store is open (classify and
        finetune append from other objects or processes), so the entries come from store.json on disk."""
        try:
            results = json.loads((self.path / MANIFEST).read_bytes()).get("results")
        except (OSError, ValueError, AttributeError):
            results = None
        if isinstance(results, dict):
            self.manifest["results"] = results
        return list((self.manifest.get("results") or {}).get(table, []))

    def _raise_if_changed_since_open(self) -> None:
        """A writer that committed a new version (delete, compact, metadata update) deletes the old
        files: a reader holding the old manifest then finds one missing. Say that, not "damaged"."""
        try:
            current = read_manifest(self.path)
        except StoreError:
            return
        if (
            current.get("updated_at") != self.manifest.get("updated_at")
            or current["shards"] != self.manifest["shards"]
        ):
            raise StoreError(
                f"Store {self.path} was changed by another cxr-embed process while this command read it (a delete, "
                "compact or index run committed a new version). Run the command again."
            )

    def check_layout(self) -> None:
        """Shards contiguous over 0..N-1, counts agree, every recorded file present at its recorded size."""
        expected = 0
        for shard in self.manifest["shards"]:
            if shard["first_row_id"] != expected:
                raise StoreDamagedError(
                    f"Store {self.path}: shard {shard['file']} starts at row {shard['first_row_id']}, expected {expected} "
                    "(store.json was edited or is damaged); restore store.json from a backup."
                )
            expected += shard["rows"]
        if expected != len(self) or self.manifest["counts"].get(
            "shards", len(self.manifest["shards"])
        ) != len(self.manifest["shards"]):
            raise StoreDamagedError(
                f"Store {self.path}: store.json counts {len(self)} rows in {self.manifest['counts'].get('shards')} shards but "
                f"lists {len(self.manifest['shards'])} shards holding {expected} rows: store.json was edited or is damaged; "
                "restore it from a backup."
            )
        for name in (LOCK_FILE, MANIFEST_LOCK):
            lock = self.path / name
            if (lock.exists() or lock.is_symlink()) and not lock.is_file():
                raise StoreDamagedError(
                    f"{lock} is not a regular file, so no writer can lock the store; remove it (`rm -r {lock}`) "
                    "when no cxr-embed process is writing the store."
                )
        for shard in self.manifest["shards"]:
            stat_check(self.path, shard, "shard")
        if self.manifest.get("errors_file"):
            stat_check(self.path, self.manifest["errors_file"], "errors file")
        if self.index_path is not None:
            stat_check(self.path, self.manifest["index"], "index")
        for table in RESULT_SCHEMAS:
            for entry in self._result_entries(table):
                stat_check(self.path, entry, "result file")

    def _load_checked_index(self) -> faiss.Index:
        n = len(self)
        entry = self.manifest.get("index")
        if not entry or not entry.get("file"):
            raise StoreError(
                f"Store {self.path} has {n} rows but no FAISS index yet: the last `cxr-embed index` run did not "
                "finish. Rerun the same command to complete it (only missing work is done)."
            )
        data = read_verified(self.path, entry, "index", parquet=False)
        try:
            index = indexes.index_from_bytes(data)
        except StoreError as exc:
            raise damaged(self.path, "index", entry["file"], str(exc)) from None
        if index.ntotal != n or not np.array_equal(indexes.index_ids(index), np.arange(n)):
            raise damaged(
                self.path,
                "index",
                entry["file"],
                f"it holds {index.ntotal} vectors whose ids are not the row_ids 0..{n - 1}",
            )
        return index
