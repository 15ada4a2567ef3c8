"""Read-only DuckDB SQL over a store: images, embeddings, results, and a nearest-neighbour macro.

Why two locks: DuckDB's parser tells us each statement's type, so anything but ``SELECT`` (and
``EXPLAIN``) is refused up front with a clear message. That alone would still let a ``SELECT`` read
arbitrary files (``read_csv('/etc/passwd')``), so after the store's views and our macro exist the
connection is also locked down: file access is limited to the store folder
(``allowed_directories`` + ``enable_external_access = false``) and the configuration is frozen
(``lock_configuration``), which also blocks installing or loading extensions. The parquet-backed
views keep working because their files live under the store folder.

The ``neighbors(image_id, k := 10, exclude_same_patient := false)`` table macro ranks every stored
embedding by ``array_cosine_similarity`` with the query image's embedding (exact, a full scan: fine
for ad-hoc SQL on stores up to a few hundred thousand rows; use :func:`cxr_embed.retrieval.search`
for the FAISS index and filters). Embeddings are unit-norm, so cosine equals the inner product that
``search`` reports. The query image itself is never returned (as in ``search --id``), so a kNN vote
over the result never counts its own label; its patient's other images are, unless
``exclude_same_patient := true``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pyarrow as pa

from cxr_embed.errors import QueryError

if TYPE_CHECKING:
    import duckdb

    from cxr_embed.store import Store

VIEWS: tuple[str, ...] = ("images", "embeddings", "predictions", "metrics", "runs", "errors")
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
    """The store's views plus the ``neighbors`` macro, on a connection that cannot touch other files.

    Writes inside the in-memory catalog are still possible at this level; :func:`check_read_only`
    refuses them before execution.
    """
    import duckdb

    con = store.connect()
    try:
        con.execute(_NEIGHBORS_MACRO)
        root = str(store.path.resolve())
        con.execute("SET allowed_directories = $dirs", {"dirs": [root]})
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except duckdb.Error as exc:  # a broken store view is a store problem, not the user's query
        con.close()
        raise QueryError(f"Could not prepare SQL over store {store.path}: {exc}") from None
    return con


def check_read_only(sql: str) -> str:
    """Return the single statement in ``sql`` if it only reads; raise :class:`QueryError` otherwise."""
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
    if kind not in _ALLOWED_TYPES:
        raise QueryError(
            f"{kind} statements are not allowed: SQL over a store is read-only (SELECT, DESCRIBE, SHOW, "
            "SUMMARIZE and EXPLAIN only). To save a result use `cxr-embed sql --out FILE`."
        )
    return sql


def run_query(store: Store, sql: str, con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Run one read-only statement over ``store`` and return the result as an Arrow table.

    ``con`` (from :func:`connect_readonly`) lets an interactive session reuse one connection.
    Malformed SQL raises :class:`QueryError` carrying DuckDB's own message.
    """
    import duckdb

    check_read_only(sql)
    own = con is None
    con = connect_readonly(store) if con is None else con
    try:
        return con.sql(sql).to_arrow_table()
    except duckdb.Error as exc:
        raise QueryError(str(exc)) from None
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
