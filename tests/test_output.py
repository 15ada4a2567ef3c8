"""The one output layer (cli/formats.py): format choice, round-trips, typed cells, fitting tables, no markup."""

from __future__ import annotations

import csv
import io
import json
import re
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cxr_embed_cli.formats import OutputSpec, emit_record, emit_rows, format_float, resolve_output
from cxr_embed_cli.main import app
from typer.testing import CliRunner

from cxr_embed.errors import ConfigError
from cxr_embed.sql import run_query

ROWS = [
    {"image_id": "a[/x]b.png", "n": 200, "p": 0.69812345, "age": 50.0, "big": 1234567.25, "emb": [0.5] * 8},
    {"image_id": "tab\there", "n": -3, "p": None, "age": 61.5, "big": 0.000012, "emb": [1.0] * 8},
]
NUMBER = re.compile(r"^-?\d")


def _table() -> pa.Table:
    return pa.table(
        {
            "image_id": ["a[/x]b.png", "tab\there", 'quote"d'],
            "n": pa.array([200, -3, 7], pa.int64()),
            "p": pa.array([0.30000001192092896, None, 1e-7], pa.float32()),
            "x": [1.5, float("nan"), 2.25],
            "flag": [True, False, None],
        }
    )


def test_format_float_is_typed_and_short() -> None:
    assert [format_float(v) for v in (0.6980, 50.0, 200.0, 12345.6, 1.5e-7, 0.0, -0.25)] == [
        "0.698", "50", "200", "12346", "1.500e-07", "0", "-0.25",
    ]  # fmt: skip


def test_resolve_output_rules(tmp_path) -> None:
    assert resolve_output(None, tmp_path / "r.PARQUET").fmt == "parquet"
    assert resolve_output(None, tmp_path / "r.jsonl").fmt == "jsonl"
    assert resolve_output("csv", tmp_path / "r.txt").fmt == "csv"  # an explicit format wins
    assert resolve_output(None, None, as_json=True).fmt == "json"
    assert resolve_output(None, None).fmt == "tsv"  # pytest's stdout is not a terminal
    with pytest.raises(ConfigError, match="Cannot tell the format of --out 'imgs.xlsx'"):
        resolve_output(None, tmp_path / "imgs.xlsx")
    with pytest.raises(ConfigError, match="Unknown --format 'xml'"):
        resolve_output("xml", None)
    with pytest.raises(ConfigError, match="--json means --format json"):
        resolve_output("csv", None, as_json=True)
    with pytest.raises(ConfigError, match="prints to the terminal"):
        resolve_output("table", tmp_path / "t.csv")


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_every_format_round_trips(tmp_path, fmt, capsys) -> None:
    out = tmp_path / f"r.{fmt}"
    assert emit_rows(_table(), OutputSpec(fmt, out)) == 3
    assert "wrote 3 rows" in capsys.readouterr().err
    if fmt == "parquet":
        back = pq.read_table(out)
        assert back.schema == _table().schema and str(back) == str(_table())  # NaN != NaN for .equals
        return
    if fmt in ("json", "jsonl"):
        text = out.read_text()
        back = json.loads(text) if fmt == "json" else [json.loads(line) for line in text.splitlines()]
    else:
        with open(out, newline="") as f:
            back = list(csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ","))
    expect = {
        "image_id": ["a[/x]b.png", "tab\there", 'quote"d'],
        "n": [200, -3, 7],
        "p": [0.3, None, 1e-7],  # float32 as its shortest text, not 0.30000001192092896
        "x": [1.5, None, 2.25],  # NaN → null
        "flag": [True, False, None],
    }
    for col, values in expect.items():
        got = [r[col] for r in back]
        if fmt in ("csv", "tsv"):
            values = [
                "" if v is None else (str(v).lower() if isinstance(v, bool) else str(v)) for v in values
            ]
            got = [g if col != "p" or not g else str(float(g)) for g in got]
        assert got == values, col


def test_dict_rows_and_nested_values(capsys) -> None:
    emit_rows(ROWS, OutputSpec("tsv"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "image_id\tn\tp\tage\tbig\temb"
    assert lines[1].split("\t")[:3] == ["a[/x]b.png", "200", "0.69812345"]
    assert lines[1].split("\t")[-1] == json.dumps([0.5] * 8)
    emit_rows(ROWS, OutputSpec("json"))
    assert json.loads(capsys.readouterr().out)[1]["emb"] == [1.0] * 8


@pytest.mark.parametrize("columns", [80, 120])
def test_table_never_cuts_a_number_and_never_reads_markup(monkeypatch, capsys, columns) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    rows = [
        {"id": f"{i:08d}_000.png", "finding": "pleural effusion with " * 3, "probability_abnormal": 0.123456 * i,
         "auroc_lower_95": 0.81234, "n": 112120 + i, "age": 50.0 + i, "note": "[/x] [bold]not markup[/bold]"}
        for i in range(5)
    ]  # fmt: skip
    emit_rows(rows, OutputSpec("table"), title="[/x] title")
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert all(len(line.rstrip()) <= columns for line in lines)
    assert "[/x] title" in out.out
    assert "…" not in out.out
    for i in range(5):
        assert str(112120 + i) in out.out and format_float(50.0 + i) in out.out
    if columns == 120:
        assert "[/x] [bold]not" in out.out
    emit_rows(rows, OutputSpec("table", wide=True))
    assert "[bold]not markup[/bold]" in capsys.readouterr().out.replace("\n", "")


def test_table_leaves_out_columns_that_do_not_fit(monkeypatch, capsys) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    rows = [{f"metric_{j}": 0.123456 + j for j in range(10)}]
    emit_rows(rows, OutputSpec("table"))
    out = capsys.readouterr()
    assert "column(s) left out to fit 40 columns" in out.err and "use --wide" in out.err
    numbers = [c for line in out.out.splitlines()[2:] for c in line.split()]
    assert numbers and all(NUMBER.match(c) and "…" not in c for c in numbers)


def test_max_rows_streams_and_says_so(capsys) -> None:
    reader = pa.RecordBatchReader.from_batches(
        pa.schema([("i", pa.int64())]),
        (pa.record_batch({"i": list(range(k, k + 100))}) for k in range(0, 10**6, 100)),
    )
    assert emit_rows(reader, OutputSpec("jsonl"), max_rows=250) == 250
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 250 and "more were left out" in out.err


def test_summary_record(capsys, tmp_path) -> None:
    obj = {"rows": 12, "labels": {"normal": 7, "abnormal": 5}, "path": "[/x]"}
    pairs = list(obj.items())
    emit_record(obj, pairs, OutputSpec("json"))
    assert json.loads(capsys.readouterr().out) == obj
    emit_record(obj, pairs, OutputSpec("tsv"))
    assert list(csv.reader(io.StringIO(capsys.readouterr().out), delimiter="\t")) == [
        ["field", "value"], ["rows", "12"], ["labels", '{"normal": 7, "abnormal": 5}'], ["path", "[/x]"],
    ]  # fmt: skip
    emit_record(obj, pairs, OutputSpec("table"), title="store")
    assert "[/x]" in capsys.readouterr().out


# ------------------------------------------------------------------ every command's output, as users see it

runner = CliRunner()


def _numeric_cells_cut(table_text: str) -> list[str]:
    """Cells that look like a number and contain the ellipsis a cut column shows."""
    return [c for c in table_text.split() if "…" in c and NUMBER.match(c.replace("…", "0"))]


@pytest.mark.parametrize("columns", ["80", "120"])
def test_no_command_table_cuts_a_number(search_store, monkeypatch, columns) -> None:
    monkeypatch.setenv("COLUMNS", columns)
    store = ["--store", str(search_store.path)]
    commands = [
        ["sql", *store, "SELECT row_id, image_id, age, label, age / 7 AS ratio, 1e9 + row_id * 0.123456 AS big, "
         "patient_id, view, sex, split, path FROM images LIMIT 20"],
        ["sql", *store, "SELECT * FROM neighbors('00000003_004.png', 5)"],
        ["search", *store, "--id", "00000003_004.png", "-k", "5"],
        ["store", "info", *store],
        ["store", "validate", *store],
    ]  # fmt: skip
    for args in commands:
        result = runner.invoke(app, [*args, "--format", "table"])
        assert result.exit_code == 0, (args, result.output)
        assert all(len(line) <= int(columns) for line in result.stdout.splitlines()), args
        assert _numeric_cells_cut(result.stdout) == [], args


def test_piped_output_is_tsv_and_markup_is_text(search_store) -> None:
    store = ["--store", str(search_store.path)]
    result = runner.invoke(app, ["sql", *store, "SELECT '[/x]' AS v, '[bold]b[/bold]' AS w"])
    assert result.exit_code == 0 and result.stdout == "v\tw\n[/x]\t[bold]b[/bold]\n", result.output
    table = runner.invoke(app, ["sql", *store, "SELECT '[/x]' AS v", "--format", "table"])
    assert table.exit_code == 0 and "[/x]" in table.stdout, table.output
    error = runner.invoke(app, ["sql", *store, 'SELECT * FROM "[/x]"'])
    assert error.exit_code == 1 and error.stderr.startswith("Error:") and "[/x]" in error.stderr
    assert "Traceback" not in error.output


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_sql_and_search_formats_round_trip(search_store, tmp_path, fmt) -> None:
    store = ["--store", str(search_store.path)]
    expect = run_query(
        search_store, "SELECT row_id, image_id, age, label FROM images ORDER BY row_id LIMIT 7"
    )
    out = tmp_path / f"r.{fmt}"
    result = runner.invoke(
        app,
        [
            "sql",
            *store,
            "SELECT row_id, image_id, age, label FROM images ORDER BY row_id LIMIT 7",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    back = _read_back(out, fmt)
    if fmt in ("csv", "tsv"):  # text: convert back with the expected column types
        back = [
            {k: type(want[k])(v) for k, v in row.items()}
            for row, want in zip(back, expect.to_pylist(), strict=True)
        ]
    assert back == expect.to_pylist()
    hits = tmp_path / f"hits.{fmt}"
    result = runner.invoke(app, ["search", *store, "--id", "00000003_004.png", "-k", "3", "--out", str(hits)])
    assert result.exit_code == 0, result.output
    rows = _read_back(hits, fmt)
    if fmt == "json":
        rows = rows["neighbors"]
    assert [int(r["rank"]) for r in rows] == [1, 2, 3]
    assert "00000003_004.png" not in {r["image_id"] for r in rows}  # never the query itself


def _read_back(path, fmt):
    if fmt == "parquet":
        return pq.read_table(path).to_pylist()
    if fmt == "json":
        return json.loads(path.read_text())
    if fmt == "jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ","))


def test_version_and_exit_codes_in_help() -> None:
    from cxr_embed import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"cxr-embed {__version__}"
    for args in (["--help"], ["index", "--help"], ["encode", "--help"]):
        text = " ".join(runner.invoke(app, args).stdout.split())
        assert "2 partial" in text, args


def test_library_warnings_are_one_line(capsys) -> None:
    import warnings

    from cxr_embed_cli.output import one_line_warnings

    saved = warnings.showwarning
    try:
        one_line_warnings()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn(
                "The least populated class has 2 members,\n  less than n_splits=5.", UserWarning, stacklevel=1
            )
    finally:
        warnings.showwarning = saved
    assert capsys.readouterr().err == (
        "Warning: The least populated class has 2 members, less than n_splits=5. (UserWarning)\n"
    )


def test_progress_bars_only_on_a_terminal_and_never_when_quiet(monkeypatch) -> None:
    import io

    from cxr_embed import progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(progress, "_silenced", False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe or log file: no bar
    with progress.progress_bar(3, "Embedding") as bar:
        assert bar._bar is None
    monkeypatch.setattr(sys, "stderr", Terminal())  # a terminal: a bar, --json or not
    with progress.progress_bar(3, "Embedding") as bar:
        assert bar._bar is not None
    progress.silence()  # cxr-embed --quiet
    with progress.progress_bar(3, "Embedding") as bar:
        assert bar._bar is None


# ------------------------------------------------- result commands: classify, study, predict, store info


@pytest.fixture(scope="module")
def scored_store(tiny_store, synth_cxr14, tmp_path_factory):
    """A copy of ``tiny_store`` (40 rows) after one ``classify`` (lr, knn; saved for ``predict``), and
    the commands whose tables and files these tests check."""
    import shutil

    from cxr_embed.model import tiny_model_dir

    path = tmp_path_factory.mktemp("scored") / "store"
    shutil.copytree(tiny_store.path, path)
    store = ["--store", str(path)]
    first = runner.invoke(app, ["classify", *store, "-m", "lr,knn", "--folds", "3", "--bootstrap", "20",
                                "--no-plots", "--json"])  # fmt: skip
    assert first.exit_code == 0, first.output
    images = [str(p) for p in sorted(synth_cxr14.glob("images_*/images/*.png"))[:2]]
    commands = {
        "classify": ["classify", *store, "-m", "lr", "--folds", "3", "--bootstrap", "20", "--no-plots", "--no-refit"],
        "study": ["study", *store, "--bootstrap", "20", "--no-plots"],
        "predict": ["predict", *store, "-c", "lr", "--device", "cpu", "--model-dir", str(tiny_model_dir()), *images],
        "store info": ["store", "info", *store],
    }  # fmt: skip
    return path, commands


@pytest.mark.parametrize("columns", ["80", "120"])
def test_result_tables_fit_and_never_cut_a_number(scored_store, monkeypatch, columns) -> None:
    monkeypatch.setenv("COLUMNS", columns)
    _, commands = scored_store
    for name, args in commands.items():
        result = runner.invoke(app, [*args, "--format", "table"])
        assert result.exit_code == 0, (name, result.output)
        assert all(len(line) <= int(columns) for line in result.stdout.splitlines()), (name, result.stdout)
        assert _numeric_cells_cut(result.stdout) == [], name
        if name in ("classify", "study"):  # the headline number and its CI always fit, as "[lo, hi]"
            assert "AUC" in result.stdout and re.search(r"\[\d\.\d+, \d\.\d+\]", result.stdout), result.stdout


def test_result_files_round_trip_at_full_precision(scored_store, tmp_path) -> None:
    """TSV (the piped default) and Parquet hold the same numbers as ``--json``, typed, for every command."""
    _, commands = scored_store
    key = {
        "classify": ("summary", "roc_auc"),
        "study": ("table", "roc_auc"),
        "predict": ("predictions", "probability"),
    }
    for name, args in commands.items():
        doc = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
        piped = runner.invoke(app, args)
        assert piped.exit_code == 0, (name, piped.output)
        tsv = list(csv.DictReader(io.StringIO(piped.stdout), delimiter="\t"))
        out = tmp_path / f"{name.replace(' ', '_')}.parquet"
        assert runner.invoke(app, [*args, "--out", str(out)]).exit_code == 0
        parquet = pq.read_table(out).to_pylist()
        if name == "store info":
            fields = {r["field"]: r["value"] for r in tsv}
            assert int(fields["rows"]) == doc["rows"] == parquet[0]["rows"] == 40
            assert fields["model_id"] == doc["model_id"] == parquet[0]["model_id"]
            continue
        part, column = key[name]
        want = sorted(r[column] for r in doc[part])
        assert sorted(float(r[column]) for r in tsv) == want, name  # shortest text of the same double
        assert sorted(r[column] for r in parquet) == want, name
        assert isinstance(parquet[0][column], float) and "[" not in piped.stdout.splitlines()[0], name


def test_a_progress_bar_fits_80_columns(monkeypatch) -> None:
    """Count, rate, time left and a note on one 80-column line (a bar that wraps is unreadable)."""
    import io

    from rich.console import Console

    from cxr_embed import progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(progress, "_silenced", False)
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(progress, "stderr_console", Console(file=terminal, width=80, force_terminal=True))
    with progress.progress_bar(12345, "fine-tune steps") as bar:
        bar._start -= 100.0  # a realistic rate (12.3/s), not the millions of an instant test
        bar.advance(1234)
        bar.note("ep 10/10 loss 0.412")
    lines = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line) for line in terminal.getvalue().splitlines()]
    shown = [line for line in lines if "1234/12345" in line]
    assert shown and all(len(line.rstrip()) <= 80 for line in shown) and "loss 0.412" in shown[-1], lines
