"""The one output layer for every command that prints rows (``emit_rows``) or a summary (``emit_record``).

API (what a command does)::

    from cxr_embed_cli.output import FormatOpt, OutOpt, WideOpt, JsonOpt, emit_rows, emit_record

    def cmd(..., fmt: FormatOpt = None, out: OutOpt = None, wide: WideOpt = False, as_json: JsonOpt = False):
        spec = resolve_output(fmt, out, as_json=as_json, wide=wide)   # validates early, before any work
        emit_rows(rows, spec, columns=(...), title="...")              # rows: list[dict] | pa.Table | RecordBatchReader
        emit_record(obj, pairs, spec, title="...")                     # a summary: field/value table, or obj as JSON

Rules it enforces so that commands cannot differ:

- formats: ``table | csv | tsv | json | jsonl | parquet``. ``--json`` is a synonym of ``--format json``.
  With ``--out FILE`` and no ``--format`` the format comes from the extension (an unknown extension is an
  error, never silently CSV). Without either: a table when stdout is a terminal, TSV with a header when it
  is piped, so ``cxr-embed sql … | cut -f2`` just works.
- the table fits the terminal (``COLUMNS`` is honoured): text wraps, numbers are never cut; columns that do
  not fit at their numbers' full width are left out with a one-line note on stderr (``--wide`` shows them
  all). Cells are typed: integers as integers, floats to 4 significant digits (``0.698``, ``50``), lists
  shortened (an embedding is 1,024 numbers). Cell text is never interpreted as rich markup.
- csv/tsv/json/jsonl/parquet keep full precision (float32 values as their shortest float32 text), NaN
  becomes null/empty, nested values become JSON text in csv/tsv, and rows are written batch by batch so
  memory stays bounded whatever the row count (``pa.RecordBatchReader`` input is never materialised).
- ``--out`` files are written atomically (temp file + rename), and a "wrote N rows to FILE" line goes to
  stderr.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import shutil
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from cxr_embed.errors import ConfigError

if TYPE_CHECKING:
    import pyarrow as pa

FORMATS: tuple[str, ...] = ("table", "csv", "tsv", "json", "jsonl", "parquet")
SUFFIX_FORMATS: dict[str, str] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
TABLE_MAX_ROWS = 10_000
"""Rows a terminal table shows unless the command passes another limit (more is unreadable anyway)."""
BATCH_ROWS = 8192
_FLOAT_DIGITS = 4
_LIST_SHOWN = 3
_TEXT_MIN_WIDTH = 12
_HEADER_MIN_WIDTH = 10
_GAP = 3  # SIMPLE_HEAD without edges: pad, divider, pad between columns


@dataclass(frozen=True)
class OutputSpec:
    """Where and how a command prints its result; made by :func:`resolve_output` before any work starts."""

    fmt: str
    out: Path | None = None
    wide: bool = False


def resolve_output(
    fmt: str | None, out: Path | None = None, *, as_json: bool = False, wide: bool = False
) -> OutputSpec:
    """Validate ``--format``/``--out``/``--json`` and pick the default format (see the module docstring)."""
    if as_json:
        if fmt not in (None, "json"):
            raise ConfigError(f"--json means --format json; drop one of --json and --format {fmt}.")
        fmt = "json"
    if fmt is not None:
        fmt = fmt.lower()
        if fmt not in FORMATS:
            raise ConfigError(f"Unknown --format {fmt!r}: use one of {', '.join(FORMATS)}.")
    if out is not None:
        by_suffix = SUFFIX_FORMATS.get(out.suffix.lower())
        if fmt is None:
            if by_suffix is None:
                known = ", ".join(sorted(SUFFIX_FORMATS))
                raise ConfigError(
                    f"Cannot tell the format of --out {out.name!r} from its extension: use one of {known}, "
                    "or add --format."
                )
            fmt = by_suffix
        if fmt == "table":
            raise ConfigError(
                "--format table prints to the terminal; write a file as csv, tsv, json, jsonl or parquet."
            )
    if fmt is None:
        fmt = "table" if _isatty(sys.stdout) else "tsv"
    if fmt == "parquet" and out is None and _isatty(sys.stdout):
        raise ConfigError("--format parquet is binary: add --out result.parquet (or pipe stdout to a file).")
    return OutputSpec(fmt=fmt, out=out, wide=wide)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------- rows in


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths, numpy scalars/arrays and NaN → plain JSON values (NaN becomes null)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return to_jsonable(obj.tolist())
    return obj


def _batches(rows: Any, columns: Sequence[str] | None) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """(schema, batches) of any supported row source, streaming a ``RecordBatchReader`` as it comes."""
    import pyarrow as pa

    if isinstance(rows, pa.RecordBatchReader):
        schema = rows.schema
        batches: Iterable[pa.RecordBatch] = rows
    else:
        table = rows if isinstance(rows, pa.Table) else _table_from_dicts(rows, columns)
        schema = table.schema
        batches = table.to_batches(max_chunksize=BATCH_ROWS)
    if columns is not None and list(columns) != schema.names:
        wanted = list(columns)
        schema = pa.schema([schema.field(c) for c in wanted])
        batches = (b.select(wanted) for b in batches)
    return schema, iter(batches)


def _table_from_dicts(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None) -> pa.Table:
    """Dict rows → Arrow, one column at a time; a column Arrow cannot type (mixed kinds) becomes text."""
    import pyarrow as pa

    names = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    arrays = []
    for name in names:
        values = [to_jsonable(r.get(name)) for r in rows]
        try:
            arrays.append(pa.array(values))
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            arrays.append(pa.array([None if v is None else _text(v) for v in values], pa.string()))
    return pa.Table.from_arrays(arrays, names=names) if names else pa.table({})


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


# --------------------------------------------------------------------------------------------- rows out


def emit_rows(
    rows: Any,
    spec: OutputSpec,
    *,
    columns: Sequence[str] | None = None,
    title: str | None = None,
    max_rows: int | None = None,
) -> int:
    """Print or write ``rows`` as ``spec`` says; return how many rows were written.

    ``rows`` is a list of dicts, a ``pa.Table`` or a ``pa.RecordBatchReader`` (streamed batch by batch).
    ``max_rows`` caps the rows written (a table defaults to :data:`TABLE_MAX_ROWS`); when rows were left
    out a note says so on stderr. ``title`` is shown above a table only.
    """
    schema, batches = _batches(rows, columns)
    limit = max_rows if max_rows is not None else (TABLE_MAX_ROWS if spec.fmt == "table" else None)
    batches, more = _capped(batches, limit)
    if spec.fmt == "table":
        written = _write_table(schema, batches, title, spec.wide)
    elif spec.fmt == "parquet":
        written = _to_target(spec.out, "wb", lambda f: _write_parquet(schema, batches, f))
    else:
        writer = {"csv": _write_delimited, "tsv": _write_delimited, "json": _write_json, "jsonl": _write_json}
        written = _to_target(spec.out, "w", lambda f: writer[spec.fmt](schema, batches, f, spec.fmt))
    if more():
        _note(
            f"showing the first {written:,} rows; more were left out (raise --max-rows, or use --out FILE)."
        )
    if spec.out is not None:
        _note(f"wrote {written:,} rows to {spec.out}")
    return written


def _capped(batches: Iterator[pa.RecordBatch], limit: int | None) -> tuple[Iterator[pa.RecordBatch], Any]:
    """Batches cut at ``limit`` rows, and a callable telling afterwards whether rows were left out."""
    state = {"more": False}

    def gen() -> Iterator[pa.RecordBatch]:
        left = limit
        for batch in batches:
            if left is None:
                yield batch
                continue
            if batch.num_rows > left:
                state["more"] = True
                if left:
                    yield batch.slice(0, left)
                return
            left -= batch.num_rows
            yield batch
        # a reader may hold further (empty) batches: only rows count as "more"

    return gen(), lambda: state["more"]


def _to_target(out: Path | None, mode: str, write: Any) -> int:
    """Run ``write(file)`` on stdout or on an atomically committed ``out``."""
    if out is None:
        stream: IO[Any] = sys.stdout.buffer if "b" in mode else sys.stdout
        n = write(stream)
        stream.flush()
        return n
    from cxr_embed.atomicio import atomic_path

    with atomic_path(out) as tmp:
        with open(tmp, mode, newline="" if "b" not in mode else None) as f:
            return write(f)


def _plain_batch(batch: pa.RecordBatch, *, nested_as_text: bool) -> pa.RecordBatch:
    """Full-precision, JSON-safe columns: float32 as its shortest text value, NaN/inf → null."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arrays = []
    for field, col in zip(batch.schema, batch.columns, strict=True):
        t = field.type
        if pa.types.is_floating(t):
            if t != pa.float64():
                col = pc.cast(pc.cast(col, pa.string()), pa.float64())
            col = pc.if_else(pc.is_finite(col), col, pa.scalar(None, pa.float64()))
        elif nested_as_text and (pa.types.is_nested(t) or pa.types.is_dictionary(t)):
            col = pa.array([None if v is None else _text(v) for v in col.to_pylist()], pa.string())
        arrays.append(col)
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)  # dates, times, decimals, UUIDs


def _write_json(schema: pa.Schema, batches: Iterator[pa.RecordBatch], f: IO[str], fmt: str) -> int:
    """JSON: one array, one row object per line (streamable); jsonl: one object per line."""
    n = 0
    array = fmt == "json"
    if array:
        f.write("[")
    for batch in batches:
        for row in _plain_batch(batch, nested_as_text=False).to_pylist():
            text = json.dumps(row, default=_json_default, ensure_ascii=False)
            if array:
                f.write(("\n  " if n == 0 else ",\n  ") + text)
            else:
                f.write(text + "\n")
            n += 1
    if array:
        f.write("\n]\n" if n else "]\n")
    return n


def _write_delimited(schema: pa.Schema, batches: Iterator[pa.RecordBatch], f: IO[str], fmt: str) -> int:
    """CSV or TSV with a header; numbers at full precision, nested values as JSON text, null as empty."""
    import pyarrow as pa

    writer = csv.writer(f, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n")
    writer.writerow(schema.names)
    n = 0
    for batch in batches:
        plain = _plain_batch(batch, nested_as_text=True)
        columns = []
        for col in plain.columns:
            if pa.types.is_boolean(col.type):
                columns.append(["" if v is None else str(v).lower() for v in col.to_pylist()])
            elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                columns.append(["" if v is None else v for v in col.to_pylist()])
            else:
                try:
                    texts = col.cast(pa.string())
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    texts = pa.array([None if v is None else str(v) for v in col.to_pylist()], pa.string())
                columns.append(["" if v is None else v for v in texts.to_pylist()])
        writer.writerows(zip(*columns, strict=True))
        n += plain.num_rows
    return n


def _write_parquet(schema: pa.Schema, batches: Iterator[pa.RecordBatch], f: IO[bytes]) -> int:
    import pyarrow.parquet as pq

    n = 0
    with pq.ParquetWriter(f, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
            n += batch.num_rows
    return n


# ------------------------------------------------------------------------------------------------ table


def format_cell(value: Any) -> str:
    """One table cell as text: ints as ints, floats to 4 significant digits, long lists shortened."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format_float(value)
    if isinstance(value, list | tuple):
        shown = ", ".join(format_cell(v) for v in value[:_LIST_SHOWN])
        if len(value) > _LIST_SHOWN + 1:
            return f"[{shown}, … {len(value)} values]"
        return f"[{', '.join(format_cell(v) for v in value)}]"
    if isinstance(value, dict):
        return json.dumps(value, default=str)
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def format_float(value: float) -> str:
    """4 significant digits without trailing zeros (``0.698``, ``50``, ``12346``, ``1.5e-07``)."""
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude < -4 or magnitude >= 15:
        return f"{value:.{_FLOAT_DIGITS - 1}e}"
    decimals = max(0, _FLOAT_DIGITS - 1 - magnitude)
    text = f"{value:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _is_numeric(t: pa.DataType) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _write_table(schema: pa.Schema, batches: Iterator[pa.RecordBatch], title: str | None, wide: bool) -> int:
    """A rich table on stdout that fits the terminal: see the module docstring."""
    names = schema.names
    numeric = [_is_numeric(f.type) for f in schema]
    cells: list[list[str]] = []
    for batch in batches:
        for row in _plain_batch(batch, nested_as_text=False).to_pylist():
            cells.append([format_cell(row[c]) for c in names])
    _print_table(names, numeric, cells, title, wide)
    return len(cells)


def _print_table(
    names: Sequence[str],
    numeric: Sequence[bool],
    cells: Sequence[Sequence[str]],
    title: str | None,
    wide: bool,
) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    widest = [max([len(r[i]) for r in cells], default=0) for i in range(len(names))]
    whole = [num or _all_intervals([r[i] for r in cells]) for i, num in enumerate(numeric)]
    least = [
        max(w, min(len(n), _HEADER_MIN_WIDTH), 1) if keep else max(min(max(w, len(n)), _TEXT_MIN_WIDTH), 1)
        for n, w, keep in zip(names, widest, whole, strict=True)
    ]
    most = [max(w, len(n), 1) for n, w in zip(names, widest, strict=True)]
    width = shutil.get_terminal_size((120, 24)).columns
    if wide:
        width = max(width, sum(most) + _GAP * (len(names) - 1))
    widths = _layout(least, most, width)
    keep = list(widths)
    if len(keep) < len(names):
        dropped = [names[i] for i in range(len(names)) if i not in widths]
        _note(
            f"{len(dropped)} column(s) left out to fit {width} columns ({', '.join(dropped)}): use --wide, "
            "or --format tsv/json/…"
        )
    # the title is its own line: as a rich table title it would be wrapped to the table's width
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for i in keep:
        table.add_column(
            Text(names[i]), justify="right" if numeric[i] else "left", width=widths[i], overflow="fold"
        )
    for row in cells:
        table.add_row(*[Text(row[i]) for i in keep])
    console = Console(width=width, soft_wrap=False, highlight=False, markup=False, emoji=False)
    if title:
        console.print(Text(title))
    console.print(table)


_INTERVAL = re.compile(r"^\[-?[\d.e+-]+, -?[\d.e+-]+\]$")


def _all_intervals(column: Sequence[str]) -> bool:
    """A text column of ``[lo, hi]`` CIs (see :func:`format_ci`): kept whole like a number, never folded."""
    shown = [c for c in column if c]
    return bool(shown) and all(_INTERVAL.match(c) or c == "reference" for c in shown)


def _layout(least: Sequence[int], most: Sequence[int], width: int) -> dict[int, int]:
    """Column index → width: columns in order while their least widths fit (numbers whole, text folded
    to ≥ 12), then the spare width goes to the kept columns up to their natural width, the columns that
    need least first (so short ids and headers are whole), the rest shared evenly."""
    widths: dict[int, int] = {}
    used = 0
    for i, lo in enumerate(least):
        extra = lo + (_GAP if widths else 0)
        if widths and used + extra > width:
            break
        widths[i] = lo
        used += extra
    spare = width - used
    for i in sorted(widths, key=lambda i: most[i] - widths[i]):  # whole columns first: fewest lines
        if 0 < most[i] - widths[i] <= spare:
            spare -= most[i] - widths[i]
            widths[i] = most[i]
    while spare > 0 and (growable := [i for i in widths if widths[i] < most[i]]):
        share = max(1, spare // len(growable))
        for i in growable:
            step = min(share, most[i] - widths[i], spare)
            widths[i] += step
            spare -= step
    return widths


# ---------------------------------------------------------------------------------------------- summary


def emit_record(
    obj: Any, pairs: Sequence[tuple[str, Any]], spec: OutputSpec, *, title: str | None = None
) -> None:
    """A summary (``store info``, ``index``, ``model info``): ``obj`` in full as JSON/JSONL, or ``pairs``
    as a field/value table (terminal), csv/tsv (two columns with a header) or a one-row Parquet file."""
    if spec.fmt in ("json", "jsonl"):
        text = json.dumps(to_jsonable(obj), indent=2 if spec.fmt == "json" else None, default=str) + "\n"
        _to_target(spec.out, "w", lambda f: f.write(text))
        if spec.out is not None:
            _note(f"wrote {spec.out}")
        return
    if spec.fmt == "parquet":
        row = {
            k: _text(to_jsonable(v)) if isinstance(v, list | dict | tuple) else to_jsonable(v)
            for k, v in pairs
        }
        emit_rows([row], spec)
        return
    shown = format_cell if spec.fmt == "table" else _text
    rows = [{"field": k, "value": shown(to_jsonable(v))} for k, v in pairs]
    emit_rows(rows, spec, columns=("field", "value"), title=title)


def emit_result(
    obj: Any,
    rows: Any,
    spec: OutputSpec,
    *,
    columns: Sequence[str] | None = None,
    table: tuple[Sequence[Mapping[str, Any]], Sequence[str]] | None = None,
    title: str | None = None,
) -> None:
    """A command's result that is both a report and a table (``classify``, ``study``, ``predict``):
    ``--format json`` prints ``obj`` whole (its historic shape), the other formats its ``rows`` at full
    precision, and a terminal table shows ``table`` = (rows, columns) when given: the same rows made to
    fit 80 columns (a CI as one ``[lo, hi]`` cell, short headers)."""
    if spec.fmt == "json":
        emit_record(obj, [], spec)
    elif spec.fmt == "table" and table is not None:
        emit_rows(list(table[0]), spec, columns=table[1], title=title)
    else:
        emit_rows(rows, spec, columns=columns, title=title)


def format_ci(ci: Sequence[Any] | None) -> str:
    """A 95% CI as one cell, ``[0.712, 0.854]`` (empty when there is none): 3 decimals for the metrics'
    scale (AUC, Brier, differences within ±1), as papers print them, so a row of CIs fits 80 columns."""
    if not ci or ci[0] is None or ci[1] is None or ci[0] != ci[0] or ci[1] != ci[1]:
        return ""
    lo, hi = float(ci[0]), float(ci[1])
    if max(abs(lo), abs(hi)) < 10:
        return f"[{lo:.3f}, {hi:.3f}]"
    return f"[{format_float(lo)}, {format_float(hi)}]"


def _note(message: str) -> None:
    """One line on stderr (never markup)."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
