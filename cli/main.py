"""Entry point of the ``cxr-embed`` console script: builds the Typer app from the command modules."""

from __future__ import annotations

from typing import Annotated

import typer
from cxr_embed_cli import (
    classify_cmds,
    demo_cmds,
    finetune_cmds,
    index_cmds,
    model_cmds,
    reproduce_cmds,
    search_cmds,
    serve_cmds,
    sql_cmds,
    synth_cmds,
)
from cxr_embed_cli.output import EXIT_CODES_HELP, one_line_warnings

app = typer.Typer(
    name="cxr-embed",
    help="MedImageInsight embeddings for chest X-rays: index a folder into Parquet + FAISS, classify "
    "Normal/Abnormal with leak-free CV, find similar cases, fine-tune, and query it all with SQL.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from cxr_embed import __version__

        typer.echo(f"cxr-embed {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the package version and exit."
        ),
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option("--quiet", "-q", help="No progress bars on stderr (errors and warnings still show)."),
    ] = False,
) -> None:
    """MedImageInsight embeddings for chest X-rays."""
    one_line_warnings()
    if quiet:
        from cxr_embed.progress import silence

        silence()


for module in (
    model_cmds,
    synth_cmds,
    index_cmds,
    classify_cmds,
    search_cmds,
    sql_cmds,
    finetune_cmds,
    demo_cmds,
    reproduce_cmds,
    serve_cmds,
):
    module.register(app)

if __name__ == "__main__":  # pragma: no cover
    app()
