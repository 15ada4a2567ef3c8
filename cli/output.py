"""Shared CLI plumbing: error handling, JSON/table output, common options.

Conventions every command follows:
- results go to stdout, progress and logs to stderr;
- ``--json`` prints one JSON document (``emit``) instead of a table;
- expected failures (:class:`cxr_embed.errors.CxrEmbedError`) print ``Error: <message>`` to stderr
  and exit 1, never a traceback (``handle_errors``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from cxr_embed.errors import CxrEmbedError
from cxr_embed.precision import PRECISION_HELP

F = TypeVar("F", bound=Callable[..., Any])

stdout = Console(soft_wrap=True)
stderr = Console(stderr=True, soft_wrap=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of a table.")]
StoreOpt = Annotated[
    str,  # not Path: Path("s3://b/x") would become the local folder "s3:/b/x" and skip the object-store refusal
    typer.Option("--store", "-s", help="Store directory or file:// URI (made by `cxr-embed index`).", envvar="CXR_EMBED_STORE"),
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
            stderr.print(f"[bold red]Error:[/] {exc}", highlight=False, markup=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            stderr.print("Interrupted.")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


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


def emit_json(obj: Any) -> None:
    """Print ``obj`` as JSON on stdout (plain print: no rich wrapping or markup)."""
    sys.stdout.write(json.dumps(to_jsonable(obj), indent=2) + "\n")
    sys.stdout.flush()


def print_table(rows: Sequence[dict[str, Any]], title: str | None = None, columns: Sequence[str] | None = None) -> None:
    """Print dict rows as a rich table on stdout; floats get 4 decimals."""
    cols = list(columns) if columns is not None else (list(rows[0].keys()) if rows else [])
    table = Table(title=title, show_lines=False)
    for c in cols:
        table.add_column(str(c))
    for row in rows:
        table.add_row(*[_fmt(row.get(c)) for c in cols])
    stdout.print(table)


def print_fields(pairs: Sequence[tuple[str, Any]], title: str | None = None) -> None:
    """Print (field, value) pairs as a two-column table: the shape of every summary and info command."""
    print_table([{"field": k, "value": v} for k, v in pairs], title=title, columns=("field", "value"))


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def info(message: str) -> None:
    """A log line on stderr."""
    stderr.print(message, highlight=False)
