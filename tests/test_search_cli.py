"""`cxr-embed search` and `cxr-embed sql` as a user runs them: output formats, errors, the prompt."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from cxr_embed_cli.main import app
from typer.testing import CliRunner

from cxr_embed.model import tiny_model_dir

runner = CliRunner()


def test_search_by_id_json(search_store) -> None:
    result = runner.invoke(
        app,
        [
            "search",
            "--store",
            str(search_store.path),
            "--id",
            "00000003_004.png",
            "-k",
            "4",
            "--exclude-same-patient",
            "--where",
            "sex = 'M'",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [n["rank"] for n in doc["neighbors"]] == [1, 2, 3, 4]
    assert all(n["patient_id"] != "00000003" and n["sex"] == "M" for n in doc["neighbors"])
    assert 0.0 <= doc["probability_abnormal"] <= 1.0 and doc["excluded_patient"] == "00000003"
    none = runner.invoke(app, ["search", "--store", str(search_store.path), "--id", "00000003_004.png",
                               "--where", "age > 1000"])  # fmt: skip
    assert none.exit_code == 0 and none.stdout.startswith("rank\tsimilarity\t"), none.output


@pytest.mark.slow  # one tiny-model forward
def test_search_by_image_table(tiny_store) -> None:
    row = tiny_store.metadata(["image_id", "path"]).to_pylist()[3]
    result = runner.invoke(
        app,
        [
            "search",
            "--store",
            str(tiny_store.path),
            "--image",
            row["path"],
            "-k",
            "3",
            "--model-dir",
            str(tiny_model_dir()),
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "--format",
            "table",
        ],
    )
    assert result.exit_code == 0, result.output
    assert row["image_id"] in result.stdout and "kNN-vote probability of abnormal:" in result.stdout
    assert "Warning" not in result.stderr and "warn" not in result.stderr.lower()  # library warnings handled


def test_search_errors_are_one_line_messages(search_store, tiny_store) -> None:
    store = ["search", "--store", str(search_store.path)]
    cases = [
        (store + ["--id", "00000003_004.png", "--where", "view = = 'PA'"], "Invalid --where"),
        (store + ["--id", "x.png", "--text", "effusion"], "exactly one query"),
        (store + ["--id", "nope.png"], "not in the store"),
        (store + ["--text", "effusion", "--model-dir", str(tiny_model_dir())], "different model"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and "Error:" in result.stderr and message in result.stderr, result.output
        assert "Traceback" not in result.output


def test_sql_formats_and_out_file(search_store, tmp_path) -> None:
    base = ["sql", "--store", str(search_store.path)]
    query = "SELECT view, count(*) AS n FROM images GROUP BY view ORDER BY view"
    csv = runner.invoke(app, [*base, query, "--format", "csv"])
    assert csv.exit_code == 0 and csv.stdout.splitlines()[:2] == ["view,n", "AP,992"], csv.output
    piped = runner.invoke(app, [*base, query])  # stdout is not a terminal: TSV with a header
    assert piped.stdout.splitlines() == ["view\tn", "AP\t992", "LL\t20", "PA\t988"], piped.output
    as_json = runner.invoke(app, [*base, query, "--json"])
    assert json.loads(as_json.stdout)[-1] == {"view": "PA", "n": 988}
    table = runner.invoke(app, [*base, "SELECT * FROM neighbors('00000003_004.png', 2)"])
    assert table.exit_code == 0 and "00000003_" in table.stdout and "00000003_004.png" not in table.stdout
    out = tmp_path / "views.parquet"
    written = runner.invoke(app, [*base, query, "--out", str(out)])
    assert written.exit_code == 0 and pq.read_table(out).to_pydict() == {
        "view": ["AP", "LL", "PA"],
        "n": [992, 20, 988],
    }


def test_sql_refusals_and_malformed_queries(search_store, tmp_path) -> None:
    base = ["sql", "--store", str(search_store.path)]
    for query, message in [
        ("DELETE FROM images", "read-only"),
        (f"COPY images TO '{tmp_path / 'x.csv'}'", "read-only"),
        (f"ATTACH '{tmp_path / 'x.duckdb'}'", "read-only"),
        ("SELECT FROM WHERE", "Parser Error"),
    ]:
        result = runner.invoke(app, [*base, query])
        assert result.exit_code == 1 and result.stderr.startswith("Error:") and message in result.stderr, (
            result.output
        )
        assert "Traceback" not in result.output
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "x.duckdb").exists()


def test_sql_interactive_prompt_reports_errors_and_continues(search_store) -> None:
    session = "SELECT count(*) AS total\nFROM images;\nSELEC 1;\nDROP VIEW images;\nSELECT 41 + 1 AS answer;\n.quit\n"
    result = runner.invoke(app, ["sql", "--store", str(search_store.path)], input=session)
    assert result.exit_code == 0, result.output
    assert "2000" in result.stdout and "42" in result.stdout
    assert "Parser Error" in result.stderr and "read-only" in result.stderr
