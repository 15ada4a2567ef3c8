"""CLI command: sql — read-only DuckDB SQL over a store, one query or an interactive prompt."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from cxr_embed_cli.output import JsonOpt, StoreOpt, handle_errors, info, print_table, stderr, to_jsonable

if TYPE_CHECKING:
    import pyarrow as pa

FORMATS = ("table", "csv", "json", "parquet")
TABLE_MAX_ROWS = 1000
HISTORY_FILE = Path.home() / ".cxr_embed_sql_history"


def sql(
    store: StoreOpt,
    query: Annotated[
        str | None, typer.Argument(help="One SELECT statement. Omit it for an interactive prompt.")
    ] = None,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            "-f",
            help="table | csv | json | parquet. Default: table on the terminal, or from the --out suffix.",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the result to this file.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Query the store with DuckDB SQL (read-only).

    Views: images (metadata), embeddings (row_id, image_id, embedding), predictions, metrics, runs,
    errors. Table macro neighbors(image_id, k := 10) ranks stored images by cosine similarity, e.g.
    SELECT n.*, i.view FROM neighbors('00000001_000.png', 5) n JOIN images i USING (row_id).
    Writes, ATTACH, COPY, extensions and SET are refused. Without a query: a prompt that reads
    statements ending in ';' until .quit.
    """
    from cxr_embed.errors import ConfigError

    fmt = _resolve_format("json" if as_json else fmt, out)
    from cxr_embed import sql as sqllib
    from cxr_embed.store import Store

    st = Store.open(store)
    if query is not None:
        _write(sqllib.run_query(st, query), fmt, out)
        return
    if out is not None:
        raise ConfigError("--out needs a query argument; the interactive prompt prints to the terminal.")
    _interactive(st, fmt)


def _resolve_format(fmt: str | None, out: Path | None) -> str:
    from cxr_embed.errors import ConfigError

    if fmt is None:
        suffix = out.suffix.lower().lstrip(".") if out is not None else ""
        fmt = suffix if suffix in FORMATS else ("csv" if out is not None else "table")
    if fmt not in FORMATS:
        raise ConfigError(f"Unknown --format {fmt!r}: use one of {', '.join(FORMATS)}.")
    if fmt == "parquet" and out is None:
        raise ConfigError("--format parquet writes a file: add --out result.parquet.")
    if fmt == "table" and out is not None:
        raise ConfigError("--format table prints to the terminal; use csv, json or parquet with --out.")
    return fmt


def _write(table: pa.Table, fmt: str, out: Path | None) -> None:
    """Render ``table`` as ``fmt`` on stdout or into ``out``."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from cxr_embed.errors import QueryError

    if fmt == "table":
        rows = [{k: _cell(v) for k, v in r.items()} for r in table.slice(0, TABLE_MAX_ROWS).to_pylist()]
        print_table(rows, columns=table.column_names)
        if table.num_rows > TABLE_MAX_ROWS:
            info(f"showing {TABLE_MAX_ROWS} of {table.num_rows} rows; add LIMIT or use --out")
        return
    if fmt == "parquet":
        pq.write_table(table, out)
    elif fmt == "json":
        text = json.dumps(to_jsonable(table.to_pylist()), indent=2) + "\n"
        if out is not None:
            out.write_text(text)
        else:
            sys.stdout.write(text)
    else:
        try:
            target = str(out) if out is not None else sys.stdout.buffer
            pcsv.write_csv(table, target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise QueryError(
                f"CSV cannot hold this result ({exc}): leave out list columns such as `embedding`, "
                "or use --format json / parquet."
            ) from None
    if out is not None:
        info(f"wrote {table.num_rows} rows to {out}")


def _cell(value: Any) -> Any:
    """Shorten list cells (an embedding is 1024 numbers) for the terminal table."""
    if isinstance(value, list) and len(value) > 4:
        return f"[{', '.join(f'{v:.4g}' if isinstance(v, float) else str(v) for v in value[:3])}, … {len(value)} values]"
    return value


def _interactive(store: Any, fmt: str) -> None:
    """Prompt loop: each error is reported and the prompt continues."""
    from cxr_embed import sql as sqllib
    from cxr_embed.errors import CxrEmbedError

    history = _enable_history()
    con = sqllib.connect_readonly(store)
    stderr.print(f"SQL over {store.path} (views: {', '.join(sqllib.VIEWS)}; neighbors(image_id, k)). End with ';', .quit to exit.")
    try:
        prompt = sys.stdin.isatty()  # piped input gets no prompts mixed into the results
        for statement in sqllib.read_statements(lambda text: input(text if prompt else "")):
            try:
                _write(sqllib.run_query(store, statement, con=con), fmt, None)
            except CxrEmbedError as exc:
                stderr.print(f"[bold red]Error:[/] {exc}", highlight=False)
    finally:
        con.close()
        if history is not None:
            history()


def _enable_history() -> Any:
    """Arrow-key editing and a history file when readline exists; returns a saver, or None."""
    try:
        import readline
    except ImportError:
        return None
    try:
        readline.read_history_file(HISTORY_FILE)
    except OSError:
        pass
    return lambda: _save_history(readline)


def _save_history(readline: Any) -> None:
    try:
        readline.write_history_file(HISTORY_FILE)
    except OSError:
        pass


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("sql")(handle_errors(sql))
