"""Shared CLI plumbing: error handling, exit codes, the output layer, common options.

Conventions every command follows:
- results go to stdout, progress and logs to stderr;
- rows and summaries are printed through ONE output layer (:mod:`cxr_embed_cli.formats`, re-exported
  here): ``resolve_output`` + ``emit_rows`` / ``emit_record`` with the shared ``FormatOpt``, ``OutOpt``,
  ``WideOpt`` and ``JsonOpt`` (a synonym of ``--format json``) options; see that module's docstring;
- exit codes: 0 all done, 1 error (nothing done), 2 partial (some inputs failed: results for the rest
  were written and the failures listed), 130 interrupted;
- expected failures (:class:`cxr_embed.errors.CxrEmbedError`) print ``Error: <message>`` to stderr
  and exit 1, never a traceback (``handle_errors``); no text a user or a file supplied is ever
  interpreted as rich markup.
"""

from __future__ import annotations

import functools
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from cxr_embed_cli.formats import (
    FORMATS,
    OutputSpec,
    emit_record,
    emit_result,
    emit_rows,
    format_cell,
    format_ci,
    format_float,
    resolve_output,
    to_jsonable,
)
from rich.console import Console
from rich.text import Text

from cxr_embed.errors import CxrEmbedError
from cxr_embed.precision import PRECISION_HELP

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PARTIAL",
    "EXIT_CODES_HELP",
    "FORMATS",
    "OutputSpec",
    "emit_json",
    "emit_record",
    "emit_result",
    "emit_rows",
    "error",
    "format_cell",
    "format_ci",
    "format_float",
    "handle_errors",
    "info",
    "quiet_progress",
    "resolve_output",
    "to_jsonable",
    "one_line_warnings",
    "warn",
]

F = TypeVar("F", bound=Callable[..., Any])

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)
"""Consoles for command modules' own lines. Text that comes from data, files or exceptions goes through
``error``/``warn``/``info``/``emit_*``, which never interpret it as markup."""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_PARTIAL = 2
EXIT_INTERRUPTED = 130
EXIT_CODES_HELP = (
    "Exit codes: 0 all done; 1 error, nothing done; 2 partial (some inputs failed: results for the rest "
    "were written and the failures listed); 130 interrupted."
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Same as --format json.")]
FormatOpt = Annotated[
    str | None,
    typer.Option(
        "--format",
        "-f",
        help="table | csv | tsv | json | jsonl | parquet. Default: from the --out extension, else a table on a "
        "terminal and TSV with a header when piped.",
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out", "-o", help="Write the result to FILE (.csv .tsv .json .jsonl .parquet) instead of stdout."
    ),
]
WideOpt = Annotated[
    bool, typer.Option("--wide", help="Show every table column even when wider than the terminal.")
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bars on stderr (same as cxr-embed -q).")
]


def quiet_progress(quiet: bool) -> None:
    """``--quiet`` on a command: every progress bar of this run off (as the global ``cxr-embed -q``)."""
    if quiet:
        from cxr_embed.progress import silence

        silence()


BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")]
StoreOpt = Annotated[
    str,  # not Path: Path("s3://b/x") would become the local folder "s3:/b/x" and skip the object-store refusal
    typer.Option(
        "--store",
        "-s",
        help="Store directory or file:// URI (made by `cxr-embed index`).",
        envvar="CXR_EMBED_STORE",
    ),
]
WhereOpt = Annotated[
    str | None,
    typer.Option(
        "--where",
        help="Only images matching this SQL condition on the images view, e.g. \"view = 'PA'\" (part of the plan).",
    ),
]
SampleOpt = Annotated[
    int | None,
    typer.Option(
        "--sample", help="A stratified subset of about N images made of whole patients (part of the plan)."
    ),
]
ModelDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--model-dir",
        help="MedImageInsight model folder (config.yaml, vision_model/, language_model/). "
        "Defaults to $CXR_EMBED_MODEL_DIR, then the `cxr-embed model pull` cache.",
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu, cuda or cuda:N.")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help=PRECISION_HELP)]


def handle_errors(fn: F) -> F:
    """Turn :class:`CxrEmbedError` into ``Error: …`` on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CxrEmbedError as exc:
            error(str(exc))
            raise typer.Exit(EXIT_ERROR) from None
        except KeyboardInterrupt:
            info("Interrupted.")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


def error(message: str) -> None:
    """``Error: message`` on stderr; the message is plain text (a file name like ``[/x]`` is not markup)."""
    stderr.print(Text.assemble(("Error:", "bold red"), " ", message))


def one_line_warnings() -> None:
    """Show every Python warning as one ``Warning: … (Category)`` line, without source lines or paths.

    Warnings a command already handles are filtered where they arise; this only shapes the rest.
    """

    def show(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
        warn(f"{message} ({category.__name__})")

    warnings.showwarning = show  # type: ignore[assignment]


def warn(message: str) -> None:
    """One ``Warning: …`` line on stderr (newlines folded: every warning the user sees is one line)."""
    stderr.print(Text.assemble(("Warning:", "yellow"), " ", " ".join(message.split())))


def emit_json(obj: Any) -> None:
    """Print ``obj`` as JSON on stdout (plain print: no rich wrapping or markup)."""
    sys.stdout.write(json.dumps(to_jsonable(obj), indent=2) + "\n")
    sys.stdout.flush()


def info(message: str) -> None:
    """A log line on stderr (plain text, never markup)."""
    stderr.print(message, markup=False, highlight=False, emoji=False)
