"""CLI command: finetune — end-to-end fine-tuning of the image tower, evaluated like `classify`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cxr_embed_cli.output import (
    FormatOpt,
    JsonOpt,
    ModelDirOpt,
    OutputSpec,
    PrecisionOpt,
    QuietOpt,
    SampleOpt,
    WhereOpt,
    WideOpt,
    emit_result,
    format_ci,
    handle_errors,
    info,
    quiet_progress,
    resolve_output,
    warn,
)
from cxr_embed_cli.reader_opts import with_reader_options


@with_reader_options
def finetune(
    ctx: typer.Context,
    source: Annotated[
        Path, typer.Argument(help="Dataset folder: ChestX-ray14, PNG/JPEG folder with labels, or DICOM.")
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Run folder: checkpoints, results, plots, exported model.")
    ],
    dataset: Annotated[str, typer.Option(help="auto | chestxray14 | folder | dicom.")] = "auto",
    model_dir: ModelDirOpt = None,
    epochs: Annotated[
        int, typer.Option(help="Training epochs (the cosine schedule spans all of them).")
    ] = 10,
    lr: Annotated[
        str,
        typer.Option(
            help="Peak AdamW learning rate (the study: 1e-5); a list (1e-4,1e-5,1e-6) runs a sweep."
        ),
    ] = "1e-5",
    head_lr_scale: Annotated[
        float,
        typer.Option(
            help="The head's learning rate is --lr x this (1: the study's single rate; a fresh head learns faster with 10-100)."
        ),
    ] = 1.0,
    weight_decay: Annotated[
        str,
        typer.Option(
            help="AdamW weight decay (none on norms, biases, depthwise convs); a list (0.1,0.2,0.3) runs a sweep."
        ),
    ] = "0.2",
    batch_size: Annotated[int, typer.Option(help="Images per optimizer step (the study: 48).")] = 48,
    accumulate: Annotated[
        int, typer.Option(help="Split each step into N micro-batches (same result, less memory).")
    ] = 1,
    precision: PrecisionOpt = "fp32",
    grad_checkpointing: Annotated[
        bool, typer.Option(help="Recompute activations in backward: much less memory, ~30% slower.")
    ] = False,
    freeze_stages: Annotated[int, typer.Option(help="Freeze the first K of the 4 DaViT stages.")] = 0,
    label: Annotated[
        str, typer.Option(help="abnormal (Normal/Abnormal) | all-findings (14 findings, multi-label).")
    ] = "abnormal",
    class_weighting: Annotated[
        bool, typer.Option(help="Weight positives by n_neg/n_pos per target (pos_weight).")
    ] = False,
    ema: Annotated[
        float | None,
        typer.Option(help="Keep an EMA of the weights with this decay (e.g. 0.999); evaluate and export it."),
    ] = None,
    augment: Annotated[
        bool, typer.Option(help="Training augmentation: rotation ±7°, zoom 0.9-1.1, brightness/contrast.")
    ] = True,
    hflip: Annotated[
        bool, typer.Option(help="Also flip horizontally (off by default: anatomy is lateralised).")
    ] = False,
    patience: Annotated[
        int, typer.Option(help="Stop after this many epochs without a better validation ROC-AUC.")
    ] = 3,
    max_steps: Annotated[
        int | None,
        typer.Option(help="Stop after N optimizer steps in total (checkpoint saved; --resume continues)."),
    ] = None,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes for decoding.")] = 0,
    device: Annotated[str, typer.Option(help="auto | cuda | cpu.")] = "auto",
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            "-s",
            help="Write predictions/metrics/runs into this store and split by its evaluation plan (shared with classify and study).",
        ),
    ] = None,
    plan: Annotated[
        str | None,
        typer.Option(
            "--plan",
            help="The store's plan to train and test on (default: the plan with --split/--folds/--where/--sample, made once).",
        ),
    ] = None,
    split: Annotated[
        str,
        typer.Option(
            "--split",
            help="Plan kind with --store: holdout (train once), kfold (one model per fold: K GPU trainings), official.",
        ),
    ] = "holdout",
    folds: Annotated[
        int, typer.Option("--folds", help="Folds of a kfold plan (one fine-tuned model each).")
    ] = 5,
    where: WhereOpt = None,
    sample: SampleOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out exactly where it stopped.")] = False,
    seed: Annotated[
        int, typer.Option(help="Seed of the split, data order, augmentation and initialisation.")
    ] = 0,
    fmt: FormatOpt = None,
    wide: WideOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    reader_options: dict | None = None,
) -> None:
    """Fine-tune the MedImageInsight image tower end to end with a linear head (a GPU job at full size).

    With --store the split is the store's evaluation plan, the one `classify` and `study` use, so both arms are tested on the same patients: a hold-out plan trains once; a kfold plan trains one model per fold (K full fine-tunings: plan GPU time accordingly). Without --store: patient-wise train/validation/test (ChestX-ray14's official lists when present). Early stopping on validation ROC-AUC, temperature scaling on validation (a warning when it cannot be trusted), then the same metrics (patient-clustered CIs), plots and tables as `classify` (arm "finetuned").

    Lists for --lr and --weight-decay run a sweep: every cell is trained and selected on validation only; the selected cell alone is tested (sweep table in the store).

    The best model is exported to OUT/model in the official folder layout: `cxr-embed index --model-dir OUT/model` embeds with it. SIGTERM saves a checkpoint and exits with status 75; rerun with --resume to continue.
    """
    quiet_progress(quiet)
    from cxr_embed.finetune import EXIT_INTERRUPTED, FineTuneConfig, resume_config
    from cxr_embed.finetune import finetune as run_finetune
    from cxr_embed.finetune.sweep import parse_values, run_sweep

    spec = resolve_output(fmt, None, as_json=as_json, wide=wide)  # --out is the run folder here
    lrs, wds = parse_values(lr, "--lr"), parse_values(weight_decay, "--weight-decay")
    values = {
        "source": str(source),
        "dataset": dataset,
        "model_dir": str(model_dir) if model_dir else None,
        "epochs": epochs,
        "lr": lrs[0],
        "head_lr_scale": head_lr_scale,
        "weight_decay": wds[0],
        "batch_size": batch_size,
        "accumulate": accumulate,
        "precision": precision,
        "grad_checkpointing": grad_checkpointing,
        "freeze_stages": freeze_stages,
        "label": label,
        "class_weighting": class_weighting,
        "ema": ema,
        "augment": augment,
        "hflip": hflip,
        "patience": patience,
        "max_steps": max_steps,
        "workers": workers,
        "device": device,
        "store": str(store) if store else None,
        "seed": seed,
        "plan": plan,
        "split": split,
        "folds": folds,
        "where": where,
        "sample": sample,
    }
    if reader_options:
        values["reader_options"] = reader_options
    if len(lrs) > 1 or len(wds) > 1:
        sweep = run_sweep(FineTuneConfig(out=str(out), **values), lrs, wds, progress=True)
        _report_sweep(sweep, spec)
        return
    if resume:
        # Only what was typed counts: defaults must not clash with the interrupted run's settings.
        # (Compared by name: typer ships its own copy of click's ParameterSource enum.)
        given = {
            k: v for k, v in values.items() if getattr(ctx.get_parameter_source(k), "name", "") != "DEFAULT"
        }
        config = resume_config(out, given)
    else:
        config = FineTuneConfig(out=str(out), **values)
    result = run_finetune(config, resume=resume, progress=True)
    _report(result, spec)
    if result.status == "interrupted":
        info(
            f"Interrupted: checkpoint saved in {out}/checkpoint. Continue with: cxr-embed finetune {source} "
            f"--out {out} --resume"
        )
        raise typer.Exit(EXIT_INTERRUPTED)


def _report_sweep(sweep, spec: OutputSpec) -> None:
    rows = [
        {
            "lr": c.lr,
            "weight_decay": c.weight_decay,
            "status": c.status,
            "val_roc_auc": c.val_roc_auc,
            "val_brier": c.val_brier,
            "selected": c.selected,
            "run_id": c.run_id,
        }
        for c in sweep.cells
    ]
    report = {
        "sweep_id": sweep.sweep_id,
        "cells": [{**r, "selected": "yes" if r["selected"] else ""} for r in rows],
        "test_metrics": sweep.test.test_metrics if sweep.test else None,
        "warnings": sweep.warnings,
    }
    emit_result(report, rows, spec, title=f"Sweep {sweep.sweep_id}: selected on validation only")
    if sweep.test is not None:
        _report(sweep.test, spec, quiet_table=spec.fmt != "table")  # files/JSON hold the sweep only
    elif sweep.selected is not None:
        info(
            f"The selected cell {sweep.selected.out} was tested before; its test results are in its result.json."
        )


def _report(result, spec: OutputSpec, quiet_table: bool = False) -> None:
    """The run's summary: --format json the whole report, other formats one row per target's test metrics."""
    for w in result.warnings:
        warn(w)
    summary = {
        "status": result.status,
        "run_id": result.run_id,
        "out": str(result.out),
        "plan_id": result.plan_id,
        "warnings": result.warnings,
        "model_dir": str(result.model_dir) if result.model_dir else None,
        "temperature": result.temperature,
        "images": result.n_images,
        "best_epoch": result.state.best_epoch,
        "best_val_roc_auc": result.state.best_auc,
        "global_step": result.state.global_step,
        "failures": len(result.failures),
        "test_metrics": result.test_metrics,
        "history": result.state.history,
    }
    rows = [
        {
            "target": t,
            "roc_auc": m.get("roc_auc"),
            "ci_low": m.get("ci_low"),
            "ci_high": m.get("ci_high"),
            "accuracy": m.get("accuracy"),
            "f1": m.get("f1"),
            "brier": m.get("brier"),
            "ece": m.get("ece"),
        }
        for t, m in result.test_metrics.items()
    ]
    table = [
        {
            "target": r["target"],
            "AUC": r["roc_auc"],
            "95% CI": format_ci((r["ci_low"], r["ci_high"])),
            "acc": r["accuracy"],
            "F1": r["f1"],
            "Brier": r["brier"],
            "ECE": r["ece"],
        }
        for r in rows
    ]
    if not quiet_table and (rows or spec.fmt == "json"):
        emit_result(
            summary,
            rows,
            spec,
            table=(table, ("target", "AUC", "95% CI", "acc", "F1", "Brier", "ECE")),
            title=f"Fine-tuned, test split ({result.n_images.get('test', 0)} images, plan "
            f"{result.plan_id or 'own split'}; 95% CI: patients resampled) — {result.run_id}",
        )
    auc = "n/a" if result.state.best_auc is None else f"{result.state.best_auc:.3f}"
    temp = "n/a" if result.temperature is None else f"{result.temperature:.3g}"
    info(
        f"{result.status}: {result.state.global_step} steps, best epoch {result.state.best_epoch} "
        f"(validation ROC-AUC {auc}), temperature {temp}"
    )
    if result.model_dir:
        info(f"Model: {result.model_dir}  (cxr-embed index SOURCE --store S --model-dir {result.model_dir})")
    if result.failures:
        info(f"{len(result.failures)} images could not be read; see {result.out}/errors.parquet")


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("finetune")(handle_errors(finetune))
