"""CLI command: sql — read-only DuckDB SQL over a store, one query or an interactive prompt."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from cxr_embed_cli.output import (
    FormatOpt,
    JsonOpt,
    OutOpt,
    OutputSpec,
    StoreOpt,
    WideOpt,
    emit_rows,
    error,
    handle_errors,
    info,
    resolve_output,
)

HISTORY_FILE = Path.home() / ".cxr_embed_sql_history"

TimeoutOpt = Annotated[
    float, typer.Option("--timeout", min=0.1, help="Stop the query after this many seconds (Error, exit 1).")
]
MaxRowsOpt = Annotated[
    int | None,
    typer.Option(
        "--max-rows",
        min=0,
        help="Write at most this many rows. Default: 10,000 for a table, all rows otherwise.",
    ),
]


def sql(
    store: StoreOpt,
    query: Annotated[
        str | None, typer.Argument(help="One SELECT statement. Omit it for an interactive prompt.")
    ] = None,
    fmt: FormatOpt = None,
    out: OutOpt = None,
    as_json: JsonOpt = False,
    wide: WideOpt = False,
    timeout: TimeoutOpt = 60.0,
    max_rows: MaxRowsOpt = None,
) -> None:
    """Query the store with DuckDB SQL (read-only).

    Views: images (metadata), embeddings (row_id, image_id, embedding), predictions, metrics, runs,
    errors. Table macro neighbors(image_id, k := 10) ranks stored images by cosine similarity, e.g.
    SELECT n.*, i.view FROM neighbors('00000001_000.png', 5) n JOIN images i USING (row_id).
    The connection cannot write any file; writes, ATTACH, COPY, extensions and SET are refused.
    Results stream, so --format json/csv/parquet keep memory bounded at any size. Without a query:
    a prompt that reads statements ending in ';' until .quit.
    """
    from cxr_embed.errors import ConfigError

    spec = resolve_output(fmt, out, as_json=as_json, wide=wide)
    from cxr_embed import sql as sqllib
    from cxr_embed.store import Store

    st = Store.open(store)
    if query is None:
        if out is not None:
            raise ConfigError("--out needs a query argument; the interactive prompt prints to the terminal.")
        _interactive(st, spec, timeout, max_rows)
        return
    sqllib.check_read_only(query)
    con = sqllib.connect_readonly(st)
    try:
        _run(con, query, spec, timeout, max_rows)
    finally:
        con.close()


def _run(con: Any, query: str, spec: OutputSpec, timeout: float, max_rows: int | None) -> None:
    """Stream one statement's result into the output layer; the reader is closed even when cut short."""
    from cxr_embed import sql as sqllib

    reader = sqllib.stream_query(con, query, timeout_s=timeout)
    try:
        emit_rows(reader, spec, max_rows=max_rows)
    finally:
        reader.close()


def _interactive(store: Any, spec: OutputSpec, timeout: float, max_rows: int | None) -> None:
    """Prompt loop: each error (or Ctrl-C during a query) is reported and the prompt continues."""
    from cxr_embed import sql as sqllib
    from cxr_embed.errors import CxrEmbedError

    history = _enable_history()
    con = sqllib.connect_readonly(store)
    info(
        f"SQL over {store.path} (views: {', '.join(sqllib.VIEWS)}; neighbors(image_id, k)). "
        "End with ';', .quit to exit."
    )
    try:
        prompt = sys.stdin.isatty()  # piped input gets no prompts mixed into the results
        for statement in sqllib.read_statements(lambda text: input(text if prompt else "")):
            try:
                _run(con, statement, spec, timeout, max_rows)
            except CxrEmbedError as exc:
                error(str(exc))
            except KeyboardInterrupt:  # Ctrl-C stops the running query, not the session
                info("Interrupted.")
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
