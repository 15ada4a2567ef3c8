"""Read-only DuckDB SQL over a real store: views, joins with results, the neighbors macro, refusals."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from cxr_embed_cli.main import app
from typer.testing import CliRunner

from cxr_embed import retrieval
from cxr_embed import sql as sqllib
from cxr_embed.errors import QueryError
from cxr_embed.sql import VIEWS, QueryTimeout, read_statements, run_query
from cxr_embed.store import Store

runner = CliRunner()


def test_every_view_is_queryable(search_store) -> None:
    counts = {
        v: run_query(search_store, f"SELECT count(*) AS n FROM {v}").column("n")[0].as_py() for v in VIEWS
    }
    assert counts == {
        "images": 2000,
        "embeddings": 2000,
        "predictions": 4,
        "metrics": 0,
        "runs": 0,
        "errors": 0,
        "audit": 0,
    }


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
    with pytest.raises(QueryError, match="Table with name nope does not exist"):
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


# ---------------------------------------------------------------- read-only by construction (issue 15.1)


def _snapshot(*roots: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``roots``: path → (size, sha256)."""
    found = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                found[str(p)] = (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            elif not p.is_dir():
                found[str(p)] = (-1, "not a regular file")
    return found


def _write_attempts(store: Path, cwd: Path) -> list[str]:
    shard = next(store.rglob("*.parquet"))
    manifest = store / "store.json"
    return [
        f"COPY images TO '{manifest}'",
        f"COPY (SELECT 1 AS a) TO '{shard}' (FORMAT parquet, USE_TMP_FILE false)",
        f"COPY images TO '{cwd}/out.csv'",
        "COPY images TO '.tmp/out.parquet' (FORMAT parquet)",
        f"EXPLAIN ANALYZE COPY images TO '{manifest}'",
        f"EXPLAIN COPY (SELECT 1) TO '{cwd}/e.csv'",
        f"EXPLAIN /* comment */ ANALYZE COPY images TO '{shard}' (FORMAT parquet)",
        f"EXPLAIN (FORMAT json) COPY images TO '{cwd}/j.csv'",
        f"EXPLAIN ANALYZE SELECT * FROM query('COPY images TO ''{cwd}/q.csv''')",
        f"SELECT * FROM query('COPY images TO ''{cwd}/q.csv''')",
        f"SELECT * FROM \"query\"('COPY images TO ''{cwd}/q.csv''')",
        f"SELECT * FROM query('SELECT 1') UNION ALL SELECT * FROM query('COPY images TO ''{cwd}/u.csv''')",
        f"ATTACH '{cwd}/x.duckdb' AS x",
        f"ATTACH '{store}/new.duckdb' AS y",
        "INSTALL httpfs",
        "LOAD httpfs",
        "CREATE TABLE t AS SELECT * FROM images",
        "INSERT INTO predictions SELECT * FROM predictions",
        "UPDATE images SET label = 1 - label",
        "DELETE FROM images",
        "DROP VIEW images",
        "WITH t AS (SELECT * FROM images) INSERT INTO predictions SELECT * FROM predictions",
        f"WITH t AS (SELECT 1) SELECT * FROM t; COPY images TO '{cwd}/m.csv'",
        f"SET temp_directory = '{cwd}'",
        "SET enable_external_access = true",
        f"SET allowed_directories = ['{cwd}']",
        f"PRAGMA profile_output = '{cwd}/profile.json'",
        f"EXPORT DATABASE '{cwd}/dump'",
        f"IMPORT DATABASE '{cwd}/dump'",
        "CHECKPOINT",
        "VACUUM",
        "CREATE MACRO evil() AS 1",
        "PIVOT images ON view USING count(*)",
    ]


def test_write_attempts_change_no_file_anywhere(search_store, tmp_path, monkeypatch) -> None:
    store = tmp_path / "store"
    shutil.copytree(search_store.path, store)
    cwd = tmp_path / "cwd"
    (cwd / ".tmp").mkdir(parents=True)
    monkeypatch.chdir(cwd)
    private = sqllib._private_temp_dir()
    before = _snapshot(store, cwd, private)
    attempts = _write_attempts(store, cwd)
    assert len(attempts) >= 20
    for statement in attempts:
        result = runner.invoke(app, ["sql", "--store", str(store), statement])
        assert result.exit_code == 1 and result.stderr.startswith("Error:"), (statement, result.output)
        assert "Traceback" not in result.output, statement
    assert _snapshot(store, cwd, private) == before


def test_the_connection_itself_cannot_write(search_store, tmp_path) -> None:
    """Layer 1 alone (the statement check bypassed): DuckDB has no file access to write with."""
    store = tmp_path / "store"
    shutil.copytree(search_store.path, store)
    before = _snapshot(store, tmp_path)
    con = sqllib.connect_readonly(Store.open(store))
    shard = next(store.rglob("*.parquet"))
    try:
        for statement in (
            f"COPY (SELECT 1 AS a) TO '{shard}' (FORMAT parquet, USE_TMP_FILE false)",
            f"COPY (SELECT 1 AS a) TO '{tmp_path}/x.csv'",
            f"ATTACH '{tmp_path}/x.duckdb' AS x",
            "SET enable_external_access = true",
            "SET lock_configuration = false",
        ):
            with pytest.raises(duckdb.Error):
                con.execute(statement)
        assert con.sql("SELECT count(*) FROM images").fetchall() == [(2000,)]  # still serves the store
    finally:
        con.close()
    assert _snapshot(store, tmp_path) == before


def test_allowed_read_forms_pass_the_check(search_store) -> None:
    for statement in (
        "EXPLAIN SELECT * FROM images",
        "EXPLAIN ANALYZE SELECT count(*) FROM images",
        "WITH t AS (SELECT view FROM images) SELECT count(*) FROM t",
        "SELECT * FROM query('SELECT 1 AS x')",
        "PIVOT images ON view IN ('PA', 'AP') USING count(*)",
        "SUMMARIZE images",
        "DESCRIBE images",
        "FROM images LIMIT 1",
    ):
        assert run_query(search_store, statement).num_rows >= 1, statement


def test_a_runaway_query_stops_at_the_timeout(search_store) -> None:
    start = time.monotonic()
    result = runner.invoke(
        app,
        [
            "sql",
            "--store",
            str(search_store.path),
            "SELECT count(*) FROM range(1e12::BIGINT)",
            "--timeout",
            "1",
        ],
    )
    assert time.monotonic() - start < 10
    assert result.exit_code == 1 and "ran longer than 1 s and was stopped" in result.stderr, result.output
    with pytest.raises(QueryTimeout):
        run_query(search_store, "SELECT count(*) FROM range(1e12::BIGINT)", timeout_s=0.5)


def test_max_rows_streams_a_huge_result(search_store) -> None:
    result = runner.invoke(
        app,
        ["sql", "--store", str(search_store.path), "SELECT * FROM range(1e12::BIGINT)", "--max-rows", "5"],
    )
    assert result.exit_code == 0 and result.stdout.splitlines() == ["range", "0", "1", "2", "3", "4"]
    assert "more were left out" in result.stderr


def test_ctrl_c_stops_the_query_with_exit_130(search_store) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cxr_embed_cli.main", "sql", "--store", str(search_store.path),
         "SELECT count(*) FROM range(1e12::BIGINT)", "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(4)  # interpreter start-up and the query running
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130 and err.strip().endswith("Interrupted."), (out, err)
    assert "Traceback" not in err
