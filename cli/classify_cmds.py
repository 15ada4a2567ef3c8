"""CLI commands ``classify``, ``study`` and ``predict``: options and output only; the work is in
cxr_embed.evaluation (classify, predict) and cxr_embed.study."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cxr_embed_cli.output import (
    EXIT_PARTIAL,
    DeviceOpt,
    FormatOpt,
    JsonOpt,
    ModelDirOpt,
    OutOpt,
    OutputSpec,
    PrecisionOpt,
    QuietOpt,
    SampleOpt,
    StoreOpt,
    WhereOpt,
    WideOpt,
    emit_result,
    emit_rows,
    format_ci,
    handle_errors,
    info,
    quiet_progress,
    resolve_output,
    warn,
)

SUMMARY_COLUMNS = (
    "target",
    "classifier",
    "n",
    "roc_auc",
    "ci_low",
    "ci_high",
    "accuracy",
    "f1",
    "brier",
    "ece",
    "sensitivity@sens90",
    "specificity@sens90",
    "seconds",
)
SUBGROUP_COLUMNS = (
    "classifier",
    "target",
    "attribute",
    "group",
    "n",
    "prevalence",
    "roc_auc",
    "brier",
    "sensitivity@sens90",
    "specificity@sens90",
)
SHORT = {
    "classifier": "model",
    "roc_auc": "AUC",
    "accuracy": "acc",
    "f1": "F1",
    "brier": "Brier",
    "ece": "ECE",
    "sensitivity@sens90": "sens90",
    "specificity@sens90": "spec90",
    "prevalence": "prev",
    "seconds": "s",
    "attribute": "attr",
}
"""Terminal-table headers: short, so that the numbers of the wide tables fit 80 columns (files keep the names)."""


@handle_errors
def classify(
    store: StoreOpt,
    models: Annotated[
        str, typer.Option("--models", "-m", help="Comma-separated classifiers: svm,lr,knn,rf,mlp, and zeroshot (text prompts; loads the model).")
    ] = "svm,lr,knn,rf,mlp",
    folds: Annotated[
        int, typer.Option("--folds", help="Cross-validation folds (patient-grouped, stratified).")
    ] = 5,
    label: Annotated[
        str,
        typer.Option(
            "--label",
            help="Target: abnormal (any finding), one finding (e.g. effusion), or all-findings (one-vs-rest for the 14).",
        ),
    ] = "abnormal",
    split: Annotated[
        str,
        typer.Option(
            "--split",
            help="cv: K patient-grouped folds; holdout: a patient-disjoint test fraction; official: train on train_val, test on test_list.",
        ),
    ] = "cv",
    test_fraction: Annotated[
        float, typer.Option("--test-fraction", help="Share of patients held out as test (--split holdout).")
    ] = 0.2,
    plan: Annotated[
        str | None,
        typer.Option(
            "--plan",
            help="Evaluate on this stored plan (see `SELECT DISTINCT plan_id, kind, params FROM splits`); default: the plan with the options given here, made once and reused.",
        ),
    ] = None,
    where: WhereOpt = None,
    sample: SampleOpt = None,
    calibration: Annotated[
        str,
        typer.Option(
            "--calibration",
            help="Post-hoc calibration fitted inside the training folds: none, platt, isotonic, temperature.",
        ),
    ] = "none",
    seed: Annotated[
        int, typer.Option("--seed", help="Seed for folds, held-out slices and the classifiers.")
    ] = 0,
    n_boot: Annotated[
        int,
        typer.Option(
            "--bootstrap", help="Bootstrap replicates (patients resampled) for the 95% CIs (0 = none)."
        ),
    ] = 1000,
    refit: Annotated[
        bool,
        typer.Option(
            "--refit/--no-refit",
            help="Refit each classifier on all rows and save it under classifiers/<run_id>/ (for `predict`).",
        ),
    ] = True,
    plots: Annotated[
        bool,
        typer.Option(
            "--plots/--no-plots",
            help="Write ROC, precision-recall and reliability PNGs under plots/<run_id>/.",
        ),
    ] = True,
    prompts: Annotated[Path | None, typer.Option("--prompts", help="Zero-shot prompts per target (TOML/JSON: [abnormal] positive = [...], negative = [...]); with --models zeroshot.")] = None,
    model_dir: ModelDirOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    fmt: FormatOpt = None,
    out: OutOpt = None,
    wide: WideOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Cross-validate classifiers on the store's embeddings, leak-free, and save everything in the store.

    The rows and folds come from an evaluation plan stored in the store (splits table) and shared with
    `finetune` and `study`, so both arms are tested on the same patients. Folds never share a patient
    (checked). Operating points (Youden J, 90% sensitivity) and calibration are fitted on a held-out
    slice of the training folds, never on the test fold; CIs resample patients. Predictions, metrics
    (per fold, pooled = fold -1, subgroups) and the run go to the store (views latest_metrics,
    latest_predictions in `cxr-embed sql`).
    """
    quiet_progress(quiet)
    from cxr_embed import evaluation
    from cxr_embed.classifiers import parse_models
    from cxr_embed.store import Store

    spec = resolve_output(fmt, out, as_json=json_out, wide=wide)
    st = Store.open(store)
    config = evaluation.ClassifyConfig(
        models=tuple(parse_models(models)),
        folds=folds,
        label=label,
        split=split,
        calibration=calibration,
        seed=seed,
        n_boot=n_boot,
        refit=refit,
        plots=plots,
        progress=True,
        test_fraction=test_fraction,
        plan_id=plan,
        where=where,
        sample=sample,
        prompts=str(prompts) if prompts else None,
        model_dir=str(model_dir) if model_dir else None,
        device=device,
        precision=precision,
    )
    run = evaluation.classify_store(st, config)
    warn_all(run.warnings)
    report = {
        "run_id": run.run_id,
        "plan_id": run.plan_id,
        "warnings": run.warnings,
        "leakage": run.leakage,
        "summary": run.summary(),
        "subgroups": run.subgroups,
        "skipped_targets": run.skipped,
        "saved_models": run.saved_models,
        "plots": run.plots,
        "timings": run.timings,
        "prompt_reports": run.prompt_reports,
    }
    info(f"run {run.run_id} on plan {run.plan}: shared patients per fold {run.leakage} (must be 0)")
    summary = run.summary()
    table = [{**r, "95% CI": format_ci((r["ci_low"], r["ci_high"]))} for r in summary]
    if label == "all-findings":
        shown = ("target", "classifier", "n", "roc_auc", "95% CI", "brier", "ece", "accuracy", "f1")
        title = "Per-finding ROC-AUC (one-vs-rest, pooled over folds)"
    else:
        shown = (
            "classifier",
            "n",
            "roc_auc",
            "95% CI",
            "accuracy",
            "f1",
            "brier",
            "ece",
            "sensitivity@sens90",
            "specificity@sens90",
            "seconds",
        )
        title = f"{label}: pooled out-of-fold metrics, plan {run.plan_id} (95% CI: patients resampled)"
    emit_result(report, summary, spec, columns=SUMMARY_COLUMNS, table=short_table(table, shown), title=title)
    if spec.fmt == "table":
        for target, scores in run.prompt_reports.items():
            emit_rows([{"prompt": p.prompt, "roc_auc": p.roc_auc} for p in scores], spec, columns=("prompt", "roc_auc"),
                      title=f"Zero-shot prompts, {target}: ROC-AUC of each positive prompt alone and of the ensemble")
    for target, why in run.skipped.items():
        info(f"skipped {target}: {why}")
    if spec.fmt == "table" and run.subgroups:
        rows, columns = short_table(run.subgroups, SUBGROUP_COLUMNS)
        emit_rows(rows, spec, columns=columns, title="Subgroups (pooled; sens90 = triage operating point)")
    elif run.subgroups and spec.fmt != "json":
        info(
            f'subgroup metrics: cxr-embed sql --store {store} "SELECT * FROM latest_metrics WHERE '
            f"run_id = '{run.run_id}' AND attribute IS NOT NULL\""
        )
    for p in run.saved_models:
        info(f"saved {p}")
    if run.plots:
        info(f"plots in {Path(run.plots[0]).parent}")


def short_table(rows: list[dict], columns: tuple[str, ...]) -> tuple[list[dict], tuple[str, ...]]:
    """``rows`` restricted to ``columns`` under their short terminal headers (:data:`SHORT`)."""
    names = tuple(SHORT.get(c, c) for c in columns)
    return [{SHORT.get(c, c): r.get(c) for c in columns} for r in rows], names


def _study_terminal(columns: tuple[str, ...]) -> tuple[str, ...]:
    """The study's "arm" column in a terminal is "frozen/lr": one column for arm and model."""
    return tuple("arm/model" if c == "arm" else c for c in columns)


@handle_errors
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG, DICOM) to score.")],
    store: StoreOpt,
    classifier: Annotated[
        str,
        typer.Option(
            "--classifier", "-c", help="Saved classifier (e.g. svm, lr-effusion) of the classify run."
        ),
    ],
    run: Annotated[
        str | None,
        typer.Option(
            "--run",
            help="Classify run whose classifier to use (default: the latest run that saved classifiers).",
        ),
    ] = None,
    model_dir: ModelDirOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Images embedded per forward pass.")
    ] = 8,
    fmt: FormatOpt = None,
    out: OutOpt = None,
    wide: WideOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Embed new images with the store's model and score them with a classifier saved by `classify`.

    Prints the calibrated probability of "abnormal" and the call at each operating point chosen during
    training (youden: balanced; sens90: triage, 90% sensitivity), and which classify run, plan and
    calibration made the classifier. The model must match the store's. An unreadable image is
    reported in its row (error) and the others are still scored.
    """
    quiet_progress(quiet)
    from cxr_embed.predict import predict_images
    from cxr_embed.store import Store

    spec = resolve_output(fmt, out, as_json=json_out, wide=wide)
    result = predict_images(
        Store.open(store),
        classifier,
        images,
        run=run,
        model_dir=model_dir,
        device=device,
        precision=precision,
        batch_size=batch_size,
    )
    info(
        f"classifier {result.classifier} ({result.target}) from run {result.run_id}, plan {result.plan_id or '-'}, "
        f"calibration {result.calibration}"
    )
    rows = [
        {
            "image": r.path,
            "probability": r.probability,
            **{f"{result.target}@{k}": v for k, v in r.decisions.items()},
            "error": r.error,
        }
        for r in result.predictions
    ]
    thr = ", ".join(f"{k} {v:.3f}" for k, v in result.thresholds.items())
    points = list(result.thresholds)
    table = [{"image": r.path, "P": r.probability, **{k: r.decisions.get(k) for k in points}, "error": r.error}
             for r in result.predictions]  # fmt: skip
    emit_result(
        result,
        rows,
        spec,
        table=(table, ("image", "P", *points, "error")),
        title=f"{result.classifier}: P({result.target}) and the call at each operating point (thresholds: {thr})",
    )
    failed = sum(r.error is not None for r in result.predictions)
    if failed:
        warn(f"{failed} of {len(result.predictions)} image(s) could not be scored; see the error column.")
        raise typer.Exit(EXIT_PARTIAL)


def warn_all(warnings: list[str]) -> None:
    """Warnings a run stored (calibration on too few rows, a temperature at its bound): always on stderr."""
    for w in warnings:
        warn(w)


STUDY_TABLE = (
    "arm",
    "roc_auc",
    "95% CI",
    "ΔAUC",
    "ΔAUC 95% CI",
    "DeLong p",
    "brier",
    "ece",
    "accuracy",
    "f1",
    "sensitivity@sens90",
    "specificity@sens90",
    "n",
)
"""The study's terminal columns, most important first: what does not fit 80 columns is left out (--wide)."""


def study_rows(table: list[dict]) -> list[dict]:
    """The study table at full precision, best ROC-AUC first, each ``x_ci`` pair as ``x_ci_low``/``x_ci_high``
    (typed numbers for csv/tsv/parquet), plus the CIs as ``[lo, hi]`` text cells for the terminal."""
    rows = []
    for r in sorted(table, key=lambda r: -(r["roc_auc"] if r["roc_auc"] == r["roc_auc"] else -1)):
        row: dict = {}
        for key, value in r.items():
            if key.endswith("_ci"):
                row[f"{key}_low"], row[f"{key}_high"] = value if value else (None, None)
            else:
                row[key] = value
        row["arm/model"] = r["arm"] if r["arm"] == "finetuned" else f"{r['arm']}/{r['classifier']}"
        row["95% CI"] = format_ci(r["roc_auc_ci"])
        row["ΔAUC"] = r["auc_diff_vs_ref"]
        row["ΔAUC 95% CI"] = format_ci(r["auc_diff_ci"]) if r["auc_diff_ci"] else "reference"
        row["DeLong p"] = r["delong_p"]
        rows.append(row)
    return rows


def study_table(
    rows: list[dict], columns: tuple[str, ...] = STUDY_TABLE
) -> tuple[list[dict], tuple[str, ...]]:
    """The terminal view of :func:`study_rows`."""
    return short_table(rows, _study_terminal(columns))


def emit_study(
    rows: list[dict], spec: OutputSpec, title: str, columns: tuple[str, ...] = STUDY_TABLE
) -> None:
    """The study rows in files at full precision (no text CI cells), in a terminal as :func:`study_table`."""
    flat = [
        {k: v for k, v in r.items() if k not in ("arm/model", "95% CI", "ΔAUC", "ΔAUC 95% CI", "DeLong p")}
        for r in rows
    ]
    emit_result(None, flat, spec, table=study_table(rows, columns), title=title)


@handle_errors
def study(
    store: StoreOpt,
    plan: Annotated[
        str | None,
        typer.Option(
            "--plan",
            help="The plan to compare on (default: the latest plan with predictions from the most arms).",
        ),
    ] = None,
    models: Annotated[
        str | None,
        typer.Option(
            "--models", "-m", help="Frozen classifiers to include (default: every one on the plan)."
        ),
    ] = None,
    finetune_run: Annotated[
        str | None,
        typer.Option(
            "--finetune-run", help="Use this fine-tuning run (its run_id) instead of the plan's latest."
        ),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(
            "--split",
            help="Instead of --plan: the plan classify made with these --split/--folds/--test-fraction/--where/--sample options.",
        ),
    ] = None,
    folds: Annotated[int, typer.Option("--folds", help="With --split cv.")] = 5,
    test_fraction: Annotated[float, typer.Option("--test-fraction", help="With --split holdout.")] = 0.2,
    where: WhereOpt = None,
    sample: SampleOpt = None,
    reference: Annotated[
        str | None,
        typer.Option(
            "--reference",
            help="Reference arm, e.g. frozen/svm (default: the frozen classifier with the best ROC-AUC).",
        ),
    ] = None,
    target: Annotated[
        str, typer.Option("--target", help="abnormal or a finding evaluated by classify/finetune.")
    ] = "abnormal",
    n_boot: Annotated[
        int, typer.Option("--bootstrap", help="Bootstrap replicates (patients resampled) for every CI.")
    ] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap.")] = 0,
    plots: Annotated[
        bool,
        typer.Option(
            "--plots/--no-plots", help="Write the ROC and reliability figures under plots/<study_id>/."
        ),
    ] = True,
    fmt: FormatOpt = None,
    out: OutOpt = None,
    wide: WideOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """The study table: every arm (frozen classifiers, fine-tuned model) on the same test rows of one plan.

    Per arm: ROC-AUC, accuracy, F1, sensitivity/specificity at the operating points each run chose on
    its training side, Brier and ECE, with patient-clustered bootstrap 95% CIs. Each arm is compared
    with the reference on the paired rows: AUC difference with DeLong's p-value and the bootstrap CI
    of the difference, Brier difference likewise. Arms scored on different rows are refused. Written
    to the store (SQL view `study`).
    """
    quiet_progress(quiet)
    from cxr_embed import evaluation
    from cxr_embed.classifiers import parse_models
    from cxr_embed.store import Store
    from cxr_embed.study import StudyConfig, run_study

    spec = resolve_output(fmt, out, as_json=json_out, wide=wide)
    settings = None
    if split or where or sample:
        settings = evaluation.ClassifyConfig(
            split=split or "cv",
            folds=folds,
            test_fraction=test_fraction,
            seed=seed,
            where=where,
            sample=sample,
        ).plan_settings()
    config = StudyConfig(
        plan_id=plan,
        settings=settings,
        models=tuple(parse_models(models)) if models else None,
        finetune_run=finetune_run,
        target=target,
        reference=reference,
        n_boot=n_boot,
        seed=seed,
        plots=plots,
        progress=True,
    )
    result = run_study(Store.open(store), config)
    if spec.fmt == "json":
        emit_result(
            {
                "study_id": result.study_id,
                "plan_id": result.plan_id,
                "target": result.target,
                "n_images": result.n_images,
                "n_patients": result.n_patients,
                "reference": result.reference,
                "table": result.table(),
                "comparisons": result.comparisons,
                "figures": result.figures,
                "notes": result.notes,
            },
            None,
            spec,
        )
    else:
        emit_study(
            study_rows(result.table()),
            spec,
            f"Study on plan {result.plan_id}: {result.n_images} images of {result.n_patients} patients "
            f"(prevalence {result.prevalence:.2f}), every arm on the same rows; 95% CIs resample patients; "
            f"paired tests vs {result.reference}",
        )
    warn_all(result.notes)
    if result.figures:
        info(f"figures: {', '.join(result.figures)}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("classify")(classify)
    app.command("study")(study)
    app.command("predict")(predict)
