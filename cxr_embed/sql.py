"""Read-only DuckDB SQL over a store: images, embeddings, results, and a nearest-neighbour macro.

Read-only by construction, with a statement check on top:

1. The connection cannot open any file. Allowing the store's files (``allowed_paths`` or
   ``allowed_directories``) would allow writing them too (``COPY … TO 'shard.parquet'
   (USE_TMP_FILE false)`` overwrites a shard), so instead the views :meth:`Store.connect` defines are
   re-pointed at Arrow datasets that this process opens for reading, and DuckDB's external access is
   switched off with nothing allowed. Its temp directory (spills of large sorts/joins) is a private
   0700 folder the process creates and removes at exit (never ``<cwd>/.tmp``); extension auto-install
   and auto-load are off; and ``lock_configuration`` freezes all of it, so no ``SET`` undoes it.
2. :func:`check_read_only` refuses anything but one ``SELECT``-like statement (DESCRIBE, SHOW,
   SUMMARIZE, PIVOT with an IN list, CTEs) or an ``EXPLAIN [ANALYZE]`` of one, and also checks the
   text inside ``query('…')``, so users get a clear message instead of a permission error.

Queries stream (:func:`stream_query`): DuckDB runs in a worker thread, results come in Arrow batches
through a small queue, and a deadline or Ctrl-C interrupts the connection.

The ``neighbors(image_id, k := 10, exclude_same_patient := false)`` table macro ranks every stored
embedding by ``array_cosine_similarity`` with the query image's embedding (exact, a full scan: fine
for ad-hoc SQL on stores up to a few hundred thousand rows; use :func:`cxr_embed.retrieval.search`
for the FAISS index and filters). Embeddings are unit-norm, so cosine equals the inner product that
``search`` reports. The query image itself is never returned (as in ``search --id``), so a kNN vote
over the result never counts its own label; its patient's other images are, unless
``exclude_same_patient := true``.
"""

from __future__ import annotations

import atexit
import queue
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from cxr_embed.errors import QueryError

if TYPE_CHECKING:
    import duckdb

    from cxr_embed.store import Store

VIEWS: tuple[str, ...] = ("images", "embeddings", "predictions", "metrics", "runs", "errors", "audit")
NEIGHBOR_COLUMNS: tuple[str, ...] = ("rank", "row_id", "image_id", "patient_id", "label", "similarity")
QUIT_COMMANDS = frozenset({".quit", ".exit", "\\q"})

_ALLOWED_TYPES = ("SELECT", "EXPLAIN")


_NEIGHBORS_MACRO = """
    CREATE OR REPLACE TEMP MACRO neighbors(query_image_id, k := 10, exclude_same_patient := false) AS TABLE
    WITH q AS (SELECT row_id AS own, embedding AS v FROM embeddings WHERE image_id = query_image_id LIMIT 1),
    same_patient AS (
        SELECT i.row_id FROM images i, images qi, q
        WHERE exclude_same_patient AND qi.row_id = q.own AND i.patient_id = qi.patient_id
    ),
    top AS (
        SELECT e.row_id, e.image_id, array_cosine_similarity(e.embedding, q.v) AS similarity
        FROM embeddings e, q
        WHERE e.row_id <> q.own AND e.row_id NOT IN (SELECT row_id FROM same_patient)
        ORDER BY similarity DESC, e.row_id
        LIMIT k
    )
    SELECT row_number() OVER (ORDER BY top.similarity DESC, top.row_id) AS rank,
           top.row_id, top.image_id, i.patient_id, i.label, top.similarity
    FROM top JOIN images i ON i.row_id = top.row_id
    ORDER BY rank
"""


def connect_readonly(store: Store) -> duckdb.DuckDBPyConnection:
    """The store's views plus the ``neighbors`` macro, on a connection that cannot write any file.

    Read-only by construction (see the module docstring): every view that reads store files is
    re-pointed at Arrow datasets this process opened for reading, then DuckDB's own file access is
    switched off entirely (no allowed paths or directories), its temp directory is a private folder
    this process owns and removes, extensions cannot be installed or loaded, and the configuration
    is locked. :func:`check_read_only` is the second layer (clear messages before anything runs).
    """
    import duckdb

    con = store.connect()
    try:
        _serve_views_from_arrow(con)
        con.execute(_NEIGHBORS_MACRO)
        con.execute("SET temp_directory = $dir", {"dir": str(_private_temp_dir())})
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("SET autoload_known_extensions = false")
        con.execute("SET allow_community_extensions = false")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except duckdb.Error as exc:  # a broken store view is a store problem, not the user's query
        con.close()
        raise QueryError(f"Could not prepare SQL over store {store.path}: {exc}") from None
    return con


_PARQUET_SCAN = re.compile(
    r"read_parquet\((?:list_value\((?P<list>(?:'(?:[^']|'')*'(?:,\s*)?)+)\)|(?P<one>'(?:[^']|'')*'))\)"
)
_SQL_STRING = re.compile(r"'((?:[^']|'')*)'")


def _serve_views_from_arrow(con: duckdb.DuckDBPyConnection) -> None:
    """Replace each ``read_parquet([...])`` in the store's views by an Arrow dataset opened read-only.

    Views stay defined by :meth:`Store.connect` (one place), but DuckDB itself no longer needs any
    file access to serve them, so it can be denied all of it: a ``COPY … TO`` a shard path has no
    permission to open the file, whatever wrapper or option (``USE_TMP_FILE false``) it uses.
    """
    import pyarrow.dataset as ds

    views = con.execute(
        "SELECT view_name, sql FROM duckdb_views() WHERE NOT internal AND temporary = false"
    ).fetchall()
    sources: dict[tuple[str, ...], str] = {}

    def to_source(match: re.Match[str]) -> str:
        files = tuple(
            f.replace("''", "'") for f in _SQL_STRING.findall(match.group("list") or match.group("one"))
        )
        if files not in sources:
            sources[files] = f"_cxr_source_{len(sources)}"
            con.register(sources[files], ds.dataset(list(files), format="parquet"))
        return sources[files]

    for name, sql in views:
        served = _PARQUET_SCAN.sub(to_source, sql)
        if "read_parquet" in served or "read_csv" in served:
            raise QueryError(
                f"View {name} reads files in a way the read-only SQL connection cannot serve: {sql}"
            )
        if served != sql:
            con.execute(f"DROP VIEW {name}")
            con.execute(served)


_TEMP_DIR: Path | None = None


def _private_temp_dir() -> Path:
    """One 0700 folder per process for DuckDB's spill files, removed when the process exits."""
    global _TEMP_DIR
    if _TEMP_DIR is None or not _TEMP_DIR.is_dir():
        _TEMP_DIR = Path(tempfile.mkdtemp(prefix="cxr-embed-sql-"))
        atexit.register(shutil.rmtree, _TEMP_DIR, True)
    return _TEMP_DIR


def check_read_only(sql: str) -> str:
    """Return the single statement in ``sql`` if it only reads; raise :class:`QueryError` otherwise.

    Wrapped statements are checked too: the statement inside ``EXPLAIN [ANALYZE]`` (which runs it)
    and the text given to ``query('…')``.
    """
    import duckdb

    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(str(exc)) from None
    if not statements:
        raise QueryError("The query is empty: write a SELECT statement, e.g. SELECT count(*) FROM images.")
    if len(statements) > 1:
        raise QueryError(f"Run one statement at a time ({len(statements)} were given).")
    kind = statements[0].type.name
    if kind == "MULTI":
        raise QueryError(
            "This statement needs to create objects first (a PIVOT without an IN list): list the values, "
            "e.g. PIVOT images ON view IN ('PA', 'AP') USING count(*)."
        )
    if kind not in _ALLOWED_TYPES:
        raise _refused(kind)
    tokens = _tokens(sql)
    if kind == "EXPLAIN":
        inner = _explained(sql, tokens)
        try:
            inner_kind = duckdb.extract_statements(inner)[0].type.name if inner else "empty EXPLAIN"
        except duckdb.Error as exc:
            raise QueryError(str(exc)) from None
        if inner_kind != "SELECT":
            raise _refused(inner_kind, " (also inside EXPLAIN)")
    for i, (text, _kind, _offset) in enumerate(tokens[:-2]):
        name = text.strip('"').lower()  # "query"(…) calls the same function
        if name in ("query", "query_table") and tokens[i + 1][0] == "(":
            arg, arg_kind, _ = tokens[i + 2]
            if arg_kind != "string_const":
                raise QueryError(f"{name}() takes a constant string here: SQL over a store is read-only.")
            if name == "query":
                check_read_only(arg[1:-1].replace("''", "'"))
    return sql


def _refused(kind: str, where: str = "") -> QueryError:
    return QueryError(
        f"{kind} statements{where} are not allowed: SQL over a store is read-only (SELECT, DESCRIBE, SHOW, "
        "SUMMARIZE and EXPLAIN only). To save a result use `cxr-embed sql --out FILE`."
    )


def _tokens(sql: str) -> list[tuple[str, str, int]]:
    """(text, kind, offset) of each token, comments dropped."""
    import duckdb

    found = duckdb.tokenize(sql)
    ends = [offset for offset, _ in found[1:]] + [len(sql)]
    out = [(sql[o:e].strip(), t.name, o) for (o, t), e in zip(found, ends, strict=True)]
    return [tok for tok in out if tok[1] != "comment"]


def _explained(sql: str, tokens: list[tuple[str, str, int]]) -> str | None:
    """The statement inside ``EXPLAIN [ANALYZE] [(options)]``, or None when it cannot be found."""
    i = 1
    if i < len(tokens) and tokens[i][0].upper() in ("ANALYZE", "ANALYSE"):
        i += 1
    if i < len(tokens) and tokens[i][0] == "(":
        while i < len(tokens) and tokens[i][0] != ")":
            i += 1
        i += 1
    if i >= len(tokens):
        return None
    return sql[tokens[i][2] :]


QUERY_TIMEOUT_S = 60.0
"""Default wall-clock limit of one ad-hoc query (``cxr-embed sql --timeout``)."""
BATCH_ROWS = 8192


class QueryTimeout(QueryError):
    """A query ran past its time limit and was stopped."""


def stream_query(
    con: duckdb.DuckDBPyConnection,
    sql: str,
    *,
    timeout_s: float | None = QUERY_TIMEOUT_S,
    batch_rows: int = BATCH_ROWS,
) -> pa.RecordBatchReader:
    """Run one read-only statement and stream its result batch by batch (memory stays bounded).

    DuckDB executes in a worker thread while the caller's thread waits on a small queue, so Ctrl-C
    (``KeyboardInterrupt``) and the ``timeout_s`` deadline are seen at once and stop the query through
    ``con.interrupt()``; a timeout raises :class:`QueryTimeout`. Closing the reader early (e.g. after
    ``--max-rows``) also stops the query.
    """
    check_read_only(sql)
    run = _StreamingRun(con, sql, timeout_s, batch_rows)
    schema = run.schema()
    return pa.RecordBatchReader.from_batches(schema, run.batches())


@dataclass
class _StreamingRun:
    con: duckdb.DuckDBPyConnection
    sql: str
    timeout_s: float | None
    batch_rows: int
    _queue: queue.Queue[tuple[str, object]] = field(default_factory=lambda: queue.Queue(maxsize=2))
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _deadline: float | None = None

    def __post_init__(self) -> None:
        self._deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        self._thread = threading.Thread(target=self._pump, name="cxr-embed-sql", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        import duckdb

        try:
            reader = self.con.sql(self.sql).fetch_record_batch(self.batch_rows)
            self._put(("schema", reader.schema))
            for batch in reader:
                if not self._put(("batch", batch)):
                    return
            self._put(("end", None))
        except (duckdb.Error, pa.ArrowException, OSError) as exc:  # OSError: Arrow's view of an interrupt
            if not self._stop.is_set():
                self._put(("error", exc))

    def _put(self, item: tuple[str, object]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _next(self) -> tuple[str, object]:
        try:
            while True:
                if self._deadline is not None and time.monotonic() > self._deadline:
                    self._halt()
                    raise QueryTimeout(
                        f"The query ran longer than {self.timeout_s:g} s and was stopped: add a WHERE or LIMIT, "
                        "or allow more time with --timeout SECONDS."
                    )
                try:
                    item = self._queue.get(timeout=0.05)
                except queue.Empty:
                    continue
                if item[0] == "error":
                    raise QueryError(str(item[1]))
                return item
        except KeyboardInterrupt:
            self._halt()
            raise

    def _halt(self) -> None:
        self._stop.set()
        self.con.interrupt()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def schema(self) -> pa.Schema:
        kind, value = self._next()
        if kind != "schema":  # pragma: no cover - the worker always sends the schema first
            raise QueryError("The query returned no result schema.")
        return value  # type: ignore[return-value]

    def batches(self) -> Iterator[pa.RecordBatch]:
        try:
            while True:
                kind, value = self._next()
                if kind == "end":
                    return
                yield value  # type: ignore[misc]
        finally:
            if self._thread is not None and self._thread.is_alive():
                self._halt()


def run_query(
    store: Store,
    sql: str,
    con: duckdb.DuckDBPyConnection | None = None,
    *,
    timeout_s: float | None = QUERY_TIMEOUT_S,
) -> pa.Table:
    """Run one read-only statement over ``store`` and return the whole result as an Arrow table.

    ``con`` (from :func:`connect_readonly`) lets an interactive session reuse one connection.
    Malformed SQL raises :class:`QueryError` carrying DuckDB's own message. For large results use
    :func:`stream_query`.
    """
    check_read_only(sql)
    own = con is None
    con = connect_readonly(store) if con is None else con
    try:
        return stream_query(con, sql, timeout_s=timeout_s).read_all()
    finally:
        if own:
            con.close()


def read_statements(readline: Callable[[str], str]) -> Iterator[str]:
    """Yield complete statements typed at a prompt: lines accumulate until one ends with ``;``.

    ``readline(prompt)`` is :func:`input` in the CLI; EOF or ``.quit``/``.exit`` ends the session.
    """
    buffer: list[str] = []
    while True:
        try:
            line = readline("sql> " if not buffer else "...> ")
        except EOFError:
            return
        if not buffer and line.strip().lower() in QUIT_COMMANDS:
            return
        if not buffer and not line.strip():
            continue
        buffer.append(line)
        if line.rstrip().endswith(";"):
            yield "\n".join(buffer)
            buffer = []
