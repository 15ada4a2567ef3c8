"""CLI command: reproduce — the study's protocol on ChestX-ray14 in one resumable command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cxr_embed_cli.output import (
    DeviceOpt,
    FormatOpt,
    JsonOpt,
    ModelDirOpt,
    WideOpt,
    emit_record,
    emit_rows,
    handle_errors,
    info,
    resolve_output,
)


def _floats(text: str, option: str) -> tuple[float, ...]:
    from cxr_embed.finetune.sweep import parse_values

    return tuple(parse_values(text, option))


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def reproduce(
    data: Annotated[
        Path, typer.Argument(help="The ChestX-ray14 folder (Data_Entry_2017*.csv, images_*/images).")
    ],
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Folder for the store, the runs, report.md and figures/ (resumable)."
        ),
    ],
    model_dir: ModelDirOpt = None,
    sample: Annotated[
        int,
        typer.Option(
            "--sample", min=10, help="Stratified whole-patient sample for the classifiers and the grid."
        ),
    ] = 10_000,
    lrs: Annotated[
        str, typer.Option("--lrs", help="Fine-tuning learning rates (comma-separated).")
    ] = "1e-4,1e-5,1e-6",
    weight_decays: Annotated[
        str, typer.Option("--weight-decays", help="Fine-tuning weight decays.")
    ] = "0.1,0.2,0.3",
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Fine-tuning epochs per grid cell.")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Fine-tuning images per step.")] = 48,
    n_boot: Annotated[
        int, typer.Option("--bootstrap", min=0, help="Patient-clustered bootstrap replicates.")
    ] = 1000,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: DeviceOpt = "auto",
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the plan and an estimated time on this machine; run nothing."),
    ] = False,
    fmt: FormatOpt = None,
    as_json: JsonOpt = False,
    wide: WideOpt = False,
) -> None:
    """Run the study's checks and compare each figure with the published one.

    Index (or reuse DIR/store), SVM with 5-fold CV on a stratified sample (published 0.82-0.83),
    the fine-tuning lr x weight-decay grid on a hold-out plan (published 0.888 / Brier 0.137),
    both arms on the same hold-out rows, zero-shot and retrieval quality; DIR/report.md and
    DIR/figures/*.png. Resumable: finished steps are recorded in DIR/reproduce.json and skipped.
    """
    spec = resolve_output(fmt, None, as_json=as_json, wide=wide)  # --out is the protocol's folder here
    from cxr_embed.reproduce import (
        ReproduceConfig,
        count_images,
        estimate,
        plan_lines,
        run_reproduce,
        seconds_per_image,
    )

    config = ReproduceConfig(
        data=str(data),
        out=str(out_dir),
        model_dir=str(model_dir) if model_dir else None,
        sample=sample,
        lrs=_floats(lrs, "--lrs"),
        weight_decays=_floats(weight_decays, "--weight-decays"),
        epochs=epochs,
        batch_size=batch_size,
        n_boot=n_boot,
        seed=seed,
        device=device,
        progress=spec.fmt != "json",
    )
    if dry_run:
        n = count_images(data)
        per_image = seconds_per_image(config.model_dir, device)
        est = estimate(config, n, per_image, (out_dir / "store" / "store.json").is_file())
        lines = plan_lines(config, n)
        total = sum(est.values())
        summary = (
            f"Estimated time on this machine: about {_duration(total)} (index {_duration(est['index'])}, "
            f"fine-tuning grid {_duration(est['sweep'])}), extrapolated from a measured forward pass of "
            f"{per_image * 1000:.0f} ms per image; an estimate that leaves out decoding, classification, "
            "the study and search eval (minutes)."
        )
        emit_record(
            {"plan": lines, "estimate_seconds": est, "seconds_per_image": per_image, "estimate": summary},
            [("step", line) for line in lines] + [("estimate", summary)],
            spec,
            title="reproduce: the plan",
        )
        return
    result = run_reproduce(config, info)
    if spec.fmt == "json":
        emit_record(result, [], spec)
        return
    emit_rows(
        result.comparison,
        spec,
        columns=("check", "measured", "published"),
        title="Measured (95% CI, patients resampled) vs published",
    )
    info(
        f"report: {result.report}"
        + (f" (steps from an earlier run: {', '.join(result.skipped)})" if result.skipped else "")
    )


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("reproduce")(handle_errors(reproduce))
