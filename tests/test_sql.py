"""Read-only DuckDB SQL over a real store: views, joins with results, the neighbors macro, refusals."""

from __future__ import annotations

import pytest

from cxr_embed import retrieval
from cxr_embed.errors import QueryError
from cxr_embed.sql import VIEWS, read_statements, run_query


def test_every_view_is_queryable(search_store) -> None:
    counts = {v: run_query(search_store, f"SELECT count(*) AS n FROM {v}").column("n")[0].as_py() for v in VIEWS}
    assert counts == {"images": 2000, "embeddings": 2000, "predictions": 4, "metrics": 0, "runs": 0, "errors": 0}


def test_join_predictions_with_images(search_store) -> None:
    table = run_query(
        search_store,
        """SELECT i.patient_id, i.view, p.probability, p.label = i.label AS same_label
           FROM predictions p JOIN images i USING (row_id) ORDER BY p.probability DESC""",
    )
    assert table.column("patient_id").to_pylist() == ["00000001", "00000003", "00000002", "00000000"]
    assert all(table.column("same_label").to_pylist())


def test_neighbors_macro_matches_search(search_store) -> None:
    table = run_query(search_store, "SELECT * FROM neighbors('00000003_004.png', 5)")
    assert table.column_names == ["rank", "row_id", "image_id", "patient_id", "label", "similarity"]
    assert table.column("rank").to_pylist() == [1, 2, 3, 4, 5]
    assert "00000003_004.png" not in table.column("image_id").to_pylist()  # never the query itself
    expected = retrieval.search_by_ids(search_store, ["00000003_004.png"], k=5)[0]
    assert table.column("row_id").to_pylist() == [n.row_id for n in expected]
    default_k = run_query(search_store, "SELECT count(*) AS n FROM neighbors('00000003_004.png')")
    assert default_k.column("n")[0].as_py() == 10
    other = run_query(search_store, "SELECT * FROM neighbors('00000003_004.png', 5, exclude_same_patient := true)")
    expected = retrieval.search_by_ids(search_store, ["00000003_004.png"], k=5, exclude_same_patient=True)[0]
    assert other.column("row_id").to_pylist() == [n.row_id for n in expected]
    assert "00000003" not in other.column("patient_id").to_pylist()


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO predictions SELECT * FROM predictions",
        "CREATE TABLE t AS SELECT 1",
        "DROP VIEW images",
        "COPY images TO 'out.csv'",
        "ATTACH 'other.duckdb'",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET threads = 1",
        "PRAGMA enable_profiling",
        "EXPORT DATABASE 'dump'",
    ],
)
def test_writes_and_side_effects_are_refused(search_store, statement) -> None:
    with pytest.raises(QueryError, match="not allowed: SQL over a store is read-only"):
        run_query(search_store, statement)


def test_a_select_cannot_read_files_outside_the_store(search_store) -> None:
    with pytest.raises(QueryError, match="Permission Error"):
        run_query(search_store, "SELECT * FROM read_csv('/etc/passwd')")


def test_malformed_query_gives_duckdb_message(search_store) -> None:
    with pytest.raises(QueryError, match="Parser Error: syntax error"):
        run_query(search_store, "SELEC image_id FROM images")
    with pytest.raises(QueryError, match='Table with name nope does not exist'):
        run_query(search_store, "SELECT * FROM nope")
    with pytest.raises(QueryError, match="one statement at a time"):
        run_query(search_store, "SELECT 1; SELECT 2")


def test_read_statements_joins_lines_until_semicolon() -> None:
    lines = iter(["SELECT 1", "  AS x;", "", "SELECT 2;", ".quit", "SELECT 3;"])
    assert list(read_statements(lambda _prompt: next(lines))) == ["SELECT 1\n  AS x;", "SELECT 2;"]
    eof = iter(["SELECT 1;"])

    def until_eof(_prompt: str) -> str:
        try:
            return next(eof)
        except StopIteration:
            raise EOFError from None

    assert list(read_statements(until_eof)) == ["SELECT 1;"]
