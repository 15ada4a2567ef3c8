"""CLI commands: ``model pull``, ``model info`` and the top-level ``encode``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cxr_embed_cli.output import (
    EXIT_CODES_HELP,
    EXIT_PARTIAL,
    BatchSizeOpt,
    DeviceOpt,
    FormatOpt,
    JsonOpt,
    ModelDirOpt,
    OutOpt,
    PrecisionOpt,
    WideOpt,
    emit_record,
    emit_rows,
    handle_errors,
    info,
    resolve_output,
    warn,
)

model_app = typer.Typer(help="Get and inspect the MedImageInsight model.", no_args_is_help=True)


@model_app.command("pull")
@handle_errors
def pull_cmd(
    revision: Annotated[
        str, typer.Option("--revision", help="Branch, tag or commit of lion-ai/MedImageInsights.")
    ] = "main",
    dest: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            help="Folder that receives 2024.09.27/ (default: the cxr-embed cache, used "
            "automatically when no --model-dir is given).",
        ),
    ] = None,
    endpoint: Annotated[
        str | None,
        typer.Option("--endpoint", help="Hugging Face endpoint or mirror URL (default: huggingface.co)."),
    ] = None,
    fmt: FormatOpt = None,
    out: OutOpt = None,
    json_out: JsonOpt = False,
    wide: WideOpt = False,
) -> None:
    """Download the official MedImageInsight files (2.5 GB) and verify their size and sha256.

    Only config.yaml, the checkpoint and the 4 tokenizer files are fetched. Files already in place and
    correct are kept, so on a machine without network you can copy the folder by hand and run this
    to verify it.
    """
    spec = resolve_output(fmt, out, as_json=json_out, wide=wide)
    from cxr_embed.model.hub import pull

    result = pull(revision=revision, dest=dest, endpoint=endpoint)
    if spec.fmt == "json":
        emit_record(result, [], spec)
        return
    rows = [
        {
            "file": str(f.path.relative_to(result.model_dir)),
            "bytes": f.size,
            "sha256": f.sha256,
            "action": "downloaded" if f.downloaded else "verified",
        }
        for f in result.files
    ]
    emit_rows(rows, spec, title="MedImageInsight v1.0.0")
    info(f"All files verified. Later commands find this folder automatically: {result.model_dir}")


@model_app.command("info")
@handle_errors
def info_cmd(
    model_dir: ModelDirOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    fmt: FormatOpt = None,
    out: OutOpt = None,
    json_out: JsonOpt = False,
    wide: WideOpt = False,
) -> None:
    """Load the model strictly and show its architecture, parameter counts, checkpoint hash and device."""
    spec = resolve_output(fmt, out, as_json=json_out, wide=wide)
    from cxr_embed.model import MedImageInsight

    details = MedImageInsight.load(model_dir, device=device, precision=precision).info()
    rows = [
        ("model_id", details.model_id),
        ("model_dir", details.model_dir),
        ("checkpoint_sha256", details.checkpoint_sha256),
        ("official_weights", details.official_weights),
        *details.architecture.items(),
        *((f"parameters.{k}", v) for k, v in details.parameters.items()),
        ("embed_dim", details.embed_dim),
        ("device", details.device),
        ("precision", details.precision),
        ("preprocess_fingerprint", details.preprocess_fingerprint),
    ]
    emit_record(details, rows, spec, title="MedImageInsight")


@handle_errors
def encode_cmd(
    images: Annotated[list[Path] | None, typer.Argument(help="Image files (PNG, JPEG, DICOM, …).")] = None,
    text: Annotated[
        list[str] | None, typer.Option("--text", "-t", help="A text to embed (repeatable).")
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output file: .npy (array) or .parquet (rows).")
    ] = ...,
    model_dir: ModelDirOpt = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="Unnormalised projections instead of L2-normalised.")
    ] = False,
    batch_size: BatchSizeOpt = 8,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    skip_failed: Annotated[
        bool, typer.Option("--skip-failed", help="Drop unreadable images (row i is then no longer input i).")
    ] = False,
    fmt: FormatOpt = None,
    json_out: JsonOpt = False,
    wide: WideOpt = False,
) -> None:
    """Embed a few images and/or texts ad hoc (rows: images in input order, then texts).

    Row i is input i: an unreadable image is a row of NaN with its reason in the Parquet `error`
    column (a .npy is refused then, unless --skip-failed). --format/--json describe the summary
    printed on stdout. For whole datasets use `cxr-embed index`.
    """
    from cxr_embed.errors import ConfigError
    from cxr_embed.model import MedImageInsight
    from cxr_embed.model.encode import OUTPUT_SUFFIXES, encode_inputs, write_embeddings

    spec = resolve_output(fmt, None, as_json=json_out, wide=wide)
    if not images and not text:
        raise ConfigError("Nothing to encode: give image files and/or --text.")
    if out.suffix not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--out must end with {' or '.join(OUTPUT_SUFFIXES)}, got {out.name!r}.")
    model = MedImageInsight.load(model_dir, device=device, precision=precision)
    result = encode_inputs(model, images or [], text or [], normalize=not raw, batch_size=batch_size)
    if result.failures and len(result.failures) == len(result.kinds):
        reasons = "; ".join(f"{f.path}: {f.reason}" for f in result.failures[:3])
        raise ConfigError(
            f"None of the {len(result.failures)} image(s) could be read ({reasons}); nothing written."
        )
    write_embeddings(result, out, model, skip_failed=skip_failed)
    for failure in result.failures:
        warn(f"{'skipped' if skip_failed else 'NaN row for'} {failure.reason}")
    rows = [
        {"row": i, "kind": k, "source": s, "error": e}
        for i, (k, s, e) in enumerate(zip(result.kinds, result.sources, result.errors, strict=True))
    ]
    if skip_failed:
        rows = [{**r, "row": i} for i, r in enumerate(r for r in rows if r["error"] is None)]
    if spec.fmt == "json":
        emit_record(
            {
                "out": str(out),
                "shape": [len(rows), result.embeddings.shape[1]],
                "normalized": not raw,
                "model_id": model.model_id,
                "checkpoint_sha256": model.checkpoint_sha256,
                "rows": rows,
                "failed": result.failures,
            },
            [],
            spec,
        )
    else:
        emit_rows(rows, spec, columns=("row", "kind", "source", "error"), title=f"{out} ({len(rows)} rows)")
    if result.failures:
        raise typer.Exit(EXIT_PARTIAL)


def register(app: typer.Typer) -> None:
    """Add ``model`` (pull, info) and ``encode`` to ``app``."""
    app.add_typer(model_app, name="model")
    app.command("encode", epilog=EXIT_CODES_HELP)(encode_cmd)
