"""CLI command: ``cxr-embed synth`` writes a synthetic chest X-ray dataset (demo and test data)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cxr_embed_cli.output import FormatOpt, JsonOpt, WideOpt, emit_record, handle_errors, info, resolve_output


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("synth")(synth)


@handle_errors
def synth(
    folder: Annotated[Path, typer.Argument(help="Folder to write the dataset into (created if needed).")],
    n: Annotated[int, typer.Option("--n", "-n", help="Number of images.", min=1)] = 200,
    layout: Annotated[
        str,
        typer.Option(
            "--layout",
            help="chestxray14 (NIH layout: images_001/images/*.png, Data_Entry_2017_v2020.csv, split lists), "
            "folder (normal/ and abnormal/ PNGs + labels.csv) or dicom (12-bit DX files + labels.csv).",
        ),
    ] = "chestxray14",
    seed: Annotated[int, typer.Option("--seed", help="Random seed: the same seed gives the same files.")] = 0,
    size: Annotated[int, typer.Option("--size", help="Image side in pixels (ChestX-ray14: 1024).")] = 1024,
    fmt: FormatOpt = None,
    json_out: JsonOpt = False,
    wide: WideOpt = False,
) -> None:
    """Write synthetic chest radiographs with visible findings, half of them abnormal.

    Patients have 1-5 follow-ups; abnormal images show 1-3 of the 14 ChestX-ray14 findings
    (effusion, nodule/mass, cardiomegaly, consolidation, pneumothorax, …). The labels, the
    patient-wise split and the metadata are written in the layout's own format, so
    `cxr-embed index OUT` reads the folder like a real dataset. Deterministic per --seed.
    """
    from cxr_embed.synth import generate

    spec = resolve_output(fmt, None, as_json=json_out, wide=wide)
    info(f"Writing {n} synthetic {size}x{size} radiographs ({layout} layout) to {folder} …")
    result = generate(folder, n, layout=layout, seed=seed, size=size)
    pairs = [
        ("folder", result.out),
        ("layout", result.layout),
        ("images", result.n_images),
        ("patients", result.n_patients),
        ("abnormal", result.n_abnormal),
        ("test split", result.n_test),
        *((f"finding.{name}", count) for name, count in result.finding_counts.items() if count),
    ]
    emit_record(result, pairs, spec, title="cxr-embed synth")
