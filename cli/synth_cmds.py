"""CLI command: ``cxr-embed synth`` writes a synthetic chest X-ray dataset (demo and test data)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cxr_embed_cli.output import JsonOpt, emit_json, handle_errors, info, print_table


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("synth")(synth)


@handle_errors
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the dataset into (created if needed).")],
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
    json_out: JsonOpt = False,
) -> None:
    """Write synthetic chest radiographs with visible findings, half of them abnormal.

    Patients have 1-5 follow-ups; abnormal images show 1-3 of the 14 ChestX-ray14 findings
    (effusion, nodule/mass, cardiomegaly, consolidation, pneumothorax, …). The labels, the
    patient-wise split and the metadata are written in the layout's own format, so
    `cxr-embed index OUT` reads the folder like a real dataset. Deterministic per --seed.
    """
    from cxr_embed.synth import generate

    info(f"Writing {n} synthetic {size}x{size} radiographs ({layout} layout) to {out} …")
    result = generate(out, n, layout=layout, seed=seed, size=size)
    if json_out:
        emit_json(result)
        return
    rows = [
        {"what": "images", "value": result.n_images},
        {"what": "patients", "value": result.n_patients},
        {"what": "abnormal", "value": result.n_abnormal},
        {"what": "test split", "value": result.n_test},
    ]
    rows += [{"what": f"  {name}", "value": count} for name, count in result.finding_counts.items() if count]
    print_table(rows, title=f"synthetic {result.layout} dataset in {result.out}")
