"""CLI commands: ``model pull``, ``model info`` and the top-level ``encode``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cxr_embed_cli.output import (
    DeviceOpt,
    JsonOpt,
    ModelDirOpt,
    PrecisionOpt,
    emit_json,
    handle_errors,
    info,
    print_fields,
    print_table,
    stdout,
)

model_app = typer.Typer(help="Get and inspect the MedImageInsight model.", no_args_is_help=True)


@model_app.command("pull")
@handle_errors
def pull_cmd(
    revision: Annotated[str, typer.Option("--revision", help="Branch, tag or commit of lion-ai/MedImageInsights.")]
    = "main",
    dest: Annotated[
        Path | None,
        typer.Option("--dir", help="Folder that receives 2024.09.27/ (default: the cxr-embed cache, used "
                                   "automatically when no --model-dir is given)."),
    ] = None,
    endpoint: Annotated[
        str | None, typer.Option("--endpoint", help="Hugging Face endpoint or mirror URL (default: huggingface.co).")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Download the official MedImageInsight files (2.5 GB) and verify their size and sha256.

    Only config.yaml, the checkpoint and the 4 tokenizer files are fetched. Files already in place and
    correct are kept, so on a machine without network you can copy the folder by hand and run this
    to verify it.
    """
    from cxr_embed.model.hub import pull

    result = pull(revision=revision, dest=dest, endpoint=endpoint)
    if json_out:
        emit_json(result)
        return
    rows = [{"file": str(f.path.relative_to(result.model_dir)), "bytes": f"{f.size:,}", "sha256": f.sha256,
             "action": "downloaded" if f.downloaded else "verified"} for f in result.files]
    print_table(rows, title="MedImageInsight v1.0.0")
    info("All files verified. Later commands find this folder automatically.")
    stdout.print(str(result.model_dir), highlight=False)


@model_app.command("info")
@handle_errors
def info_cmd(model_dir: ModelDirOpt = None, device: DeviceOpt = "auto", precision: PrecisionOpt = "fp32",
             json_out: JsonOpt = False) -> None:
    """Load the model strictly and show its architecture, parameter counts, checkpoint hash and device."""
    from cxr_embed.model import MedImageInsight

    details = MedImageInsight.load(model_dir, device=device, precision=precision).info()
    if json_out:
        emit_json(details)
        return
    rows = [
        ("model_id", details.model_id),
        ("model_dir", details.model_dir),
        ("checkpoint_sha256", details.checkpoint_sha256),
        ("official_weights", details.official_weights),
        *details.architecture.items(),
        *((f"parameters.{k}", f"{v:,}") for k, v in details.parameters.items()),
        ("embed_dim", details.embed_dim),
        ("device", details.device),
        ("precision", details.precision),
        ("preprocess_fingerprint", details.preprocess_fingerprint),
    ]
    print_fields(rows, title="MedImageInsight")


@handle_errors
def encode_cmd(
    images: Annotated[list[Path] | None, typer.Argument(help="Image files (PNG, JPEG, DICOM, …).")] = None,
    text: Annotated[list[str] | None, typer.Option("--text", "-t", help="A text to embed (repeatable).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file: .npy (array) or .parquet (rows).")] = ...,
    model_dir: ModelDirOpt = None,
    raw: Annotated[bool, typer.Option("--raw", help="Unnormalised projections instead of L2-normalised.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 8,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    json_out: JsonOpt = False,
) -> None:
    """Embed a few images and/or texts ad hoc (rows: images in order, then texts).

    Unreadable images are reported and skipped. For whole datasets use `cxr-embed index`.
    """
    from cxr_embed.errors import ConfigError
    from cxr_embed.model import MedImageInsight
    from cxr_embed.model.encode import OUTPUT_SUFFIXES, encode_inputs, write_embeddings

    if not images and not text:
        raise ConfigError("Nothing to encode: give image files and/or --text.")
    if out.suffix not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--out must end with {' or '.join(OUTPUT_SUFFIXES)}, got {out.name!r}.")
    model = MedImageInsight.load(model_dir, device=device, precision=precision)
    result = encode_inputs(model, images or [], text or [], normalize=not raw, batch_size=batch_size)
    write_embeddings(result, out, model)
    for failure in result.failures:
        info(f"skipped {failure.path}: {failure.reason}")
    summary = {
        "out": str(out),
        "shape": list(result.embeddings.shape),
        "normalized": not raw,
        "model_id": model.model_id,
        "checkpoint_sha256": model.checkpoint_sha256,
        "rows": [{"row": i, "kind": k, "source": s} for i, (k, s) in
                 enumerate(zip(result.kinds, result.sources, strict=True))],
        "failed": result.failures,
    }
    if json_out:
        emit_json(summary)
        return
    print_table(summary["rows"], title=f"{out} {tuple(result.embeddings.shape)}")


def register(app: typer.Typer) -> None:
    """Add ``model`` (pull, info) and ``encode`` to ``app``."""
    app.add_typer(model_app, name="model")
    app.command("encode")(encode_cmd)
