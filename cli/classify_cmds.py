"""CLI commands ``classify``, ``study`` and ``predict``: options and output only; the work is in
cxr_embed.evaluation (classify, predict) and cxr_embed.study."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cxr_embed_cli.output import (
    DeviceOpt,
    JsonOpt,
    ModelDirOpt,
    PrecisionOpt,
    StoreOpt,
    emit_json,
    handle_errors,
    info,
    print_table,
    stderr,
)

WhereOpt = Annotated[str | None, typer.Option("--where", help="Only images matching this SQL condition on the images view, e.g. \"view = 'PA'\" (part of the plan).")]
SampleOpt = Annotated[int | None, typer.Option("--sample", help="A stratified subset of about N images made of whole patients (part of the plan).")]

SUMMARY_COLUMNS = ("target", "classifier", "n", "roc_auc", "ci_low", "ci_high", "accuracy", "f1", "brier", "ece",
                   "sensitivity@sens90", "specificity@sens90", "seconds")
SUBGROUP_COLUMNS = ("classifier", "target", "attribute", "group", "n", "prevalence", "roc_auc", "brier",
                    "sensitivity@sens90", "specificity@sens90")


@handle_errors
def classify(
    store: StoreOpt,
    models: Annotated[str, typer.Option("--models", "-m", help="Comma-separated classifiers: svm,lr,knn,rf,mlp.")] = "svm,lr,knn,rf,mlp",
    folds: Annotated[int, typer.Option("--folds", help="Cross-validation folds (patient-grouped, stratified).")] = 5,
    label: Annotated[str, typer.Option("--label", help="Target: abnormal (any finding), one finding (e.g. effusion), or all-findings (one-vs-rest for the 14).")] = "abnormal",
    split: Annotated[str, typer.Option("--split", help="cv: K patient-grouped folds; holdout: a patient-disjoint test fraction; official: train on train_val, test on test_list.")] = "cv",
    test_fraction: Annotated[float, typer.Option("--test-fraction", help="Share of patients held out as test (--split holdout).")] = 0.2,
    plan: Annotated[str | None, typer.Option("--plan", help="Evaluate on this stored plan (see `SELECT DISTINCT plan_id, kind, params FROM splits`); default: the plan with the options given here, made once and reused.")] = None,
    where: WhereOpt = None,
    sample: SampleOpt = None,
    calibration: Annotated[str, typer.Option("--calibration", help="Post-hoc calibration fitted inside the training folds: none, platt, isotonic, temperature.")] = "none",
    seed: Annotated[int, typer.Option("--seed", help="Seed for folds, held-out slices and the classifiers.")] = 0,
    n_boot: Annotated[int, typer.Option("--bootstrap", help="Bootstrap replicates (patients resampled) for the 95% CIs (0 = none).")] = 1000,
    refit: Annotated[bool, typer.Option("--refit/--no-refit", help="Refit each classifier on all rows and save it under classifiers/<run_id>/ (for `predict`).")] = True,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write ROC, precision-recall and reliability PNGs under plots/<run_id>/.")] = True,
    json_out: JsonOpt = False,
) -> None:
    """Cross-validate classifiers on the store's embeddings, leak-free, and save everything in the store.

    The rows and folds come from an evaluation plan stored in the store (splits table) and shared with
    `finetune` and `study`, so both arms are tested on the same patients. Folds never share a patient
    (checked). Operating points (Youden J, 90% sensitivity) and calibration are fitted on a held-out
    slice of the training folds, never on the test fold; CIs resample patients. Predictions, metrics
    (per fold, pooled = fold -1, subgroups) and the run go to the store (views latest_metrics,
    latest_predictions in `cxr-embed sql`).
    """
    from cxr_embed import evaluation
    from cxr_embed.classifiers import parse_models
    from cxr_embed.store import Store

    st = Store.open(store)
    config = evaluation.ClassifyConfig(
        models=tuple(parse_models(models)), folds=folds, label=label, split=split, calibration=calibration,
        seed=seed, n_boot=n_boot, refit=refit, plots=plots, progress=not json_out, test_fraction=test_fraction,
        plan_id=plan, where=where, sample=sample,
    )
    run = evaluation.classify_store(st, config)
    warn_all(run.warnings)
    if json_out:
        emit_json({
            "run_id": run.run_id, "plan_id": run.plan_id, "warnings": run.warnings, "leakage": run.leakage, "summary": run.summary(), "subgroups": run.subgroups,
            "skipped_targets": run.skipped, "saved_models": run.saved_models, "plots": run.plots, "timings": run.timings,
        })
        return
    info(f"run {run.run_id} on plan {run.plan}: shared patients per fold {run.leakage} (must be 0)")
    if label == "all-findings":
        print_table(
            [{"finding": r.target, "classifier": r.classifier, "roc_auc": r.pooled.values["roc_auc"],
              "ci_low": r.pooled.auc_ci[0], "ci_high": r.pooled.auc_ci[1], "prevalence": r.pooled.values["prevalence"]}
             for r in run.results],
            title="Per-finding ROC-AUC (one-vs-rest, pooled over folds)",
        )
        for target, why in run.skipped.items():
            info(f"skipped {target}: {why}")
    else:
        print_table(run.summary(), title=f"{label}: pooled out-of-fold metrics, plan {run.plan_id} (95% CI: patients resampled)",
                    columns=SUMMARY_COLUMNS)
    print_table(run.subgroups, title="Subgroups (pooled; sens90 = triage operating point)", columns=SUBGROUP_COLUMNS)
    for p in run.saved_models:
        info(f"saved {p}")
    if run.plots:
        info(f"plots in {Path(run.plots[0]).parent}")


@handle_errors
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG, DICOM) to score.")],
    store: StoreOpt,
    classifier: Annotated[str, typer.Option("--classifier", "-c", help="Saved classifier (e.g. svm, lr-effusion) of the classify run.")],
    run: Annotated[str | None, typer.Option("--run", help="Classify run whose classifier to use (default: the latest run that saved classifiers).")] = None,
    model_dir: ModelDirOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images embedded per forward pass.")] = 8,
    json_out: JsonOpt = False,
) -> None:
    """Embed new images with the store's model and score them with a classifier saved by `classify`.

    Prints the calibrated probability of "abnormal" and the call at each operating point chosen during
    training (youden: balanced; sens90: triage, 90% sensitivity), and which classify run, plan and
    calibration made the classifier. The model must match the store's. An unreadable image is
    reported in its row (error) and the others are still scored.
    """
    from cxr_embed.predict import predict_images
    from cxr_embed.store import Store

    result = predict_images(Store.open(store), classifier, images, run=run, model_dir=model_dir, device=device,
                            precision=precision, batch_size=batch_size)
    if json_out:
        emit_json(result)
        return
    info(f"classifier {result.classifier} ({result.target}) from run {result.run_id}, plan {result.plan_id or '-'}, "
         f"calibration {result.calibration}")
    rows = [{"image": r.path, "probability": r.probability,
             **{f"{result.target}@{k}": ("yes" if v else "no") for k, v in r.decisions.items()}, "error": r.error or ""}
            for r in result.predictions]
    thr = ", ".join(f"{k} {v:.3f}" for k, v in result.thresholds.items())
    print_table(rows, title=f"{result.classifier} ({result.target}), run {result.run_id}; thresholds: {thr}")


def warn_all(warnings: list[str]) -> None:
    """Warnings a run stored (calibration on too few rows, a temperature at its bound): always on stderr."""
    for w in warnings:
        stderr.print(f"[bold yellow]Warning:[/] {w}", highlight=False)


def _with_ci(value, ci) -> str:
    if value is None or value != value:
        return ""
    if ci is None or ci[0] is None or ci[0] != ci[0]:
        return f"{value:.3f}"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def study_rows(table: list[dict]) -> list[dict]:
    """The study table for print_table: each value with its 95% CI in one cell, best ROC-AUC first."""
    rows = []
    for r in sorted(table, key=lambda r: -(r["roc_auc"] if r["roc_auc"] == r["roc_auc"] else -1)):
        rows.append({
            "arm": r["arm"], "classifier": r["classifier"], "n": r["n"],
            "ROC-AUC [95% CI]": _with_ci(r["roc_auc"], r["roc_auc_ci"]),
            "accuracy": r["accuracy"], "F1": r["f1"], "sens@sens90": r["sensitivity@sens90"],
            "spec@sens90": r["specificity@sens90"], "Brier [95% CI]": _with_ci(r["brier"], r["brier_ci"]),
            "ECE": r["ece"], "ΔAUC vs ref [95% CI]": _with_ci(r["auc_diff_vs_ref"], r["auc_diff_ci"]) or "reference",
            "DeLong p": r["delong_p"],
        })
    return rows


@handle_errors
def study(
    store: StoreOpt,
    plan: Annotated[str | None, typer.Option("--plan", help="The plan to compare on (default: the latest plan with predictions from the most arms).")] = None,
    models: Annotated[str | None, typer.Option("--models", "-m", help="Frozen classifiers to include (default: every one on the plan).")] = None,
    finetune_run: Annotated[str | None, typer.Option("--finetune-run", help="Use this fine-tuning run (its run_id) instead of the plan's latest.")] = None,
    split: Annotated[str | None, typer.Option("--split", help="Instead of --plan: the plan classify made with these --split/--folds/--test-fraction/--where/--sample options.")] = None,
    folds: Annotated[int, typer.Option("--folds", "-k", help="With --split cv.")] = 5,
    test_fraction: Annotated[float, typer.Option("--test-fraction", help="With --split holdout.")] = 0.2,
    where: WhereOpt = None,
    sample: SampleOpt = None,
    reference: Annotated[str | None, typer.Option("--reference", help="Reference arm, e.g. frozen/svm (default: the frozen classifier with the best ROC-AUC).")] = None,
    target: Annotated[str, typer.Option("--target", help="abnormal or a finding evaluated by classify/finetune.")] = "abnormal",
    n_boot: Annotated[int, typer.Option("--bootstrap", help="Bootstrap replicates (patients resampled) for every CI.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap.")] = 0,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write the ROC and reliability figures under plots/<study_id>/.")] = True,
    json_out: JsonOpt = False,
) -> None:
    """The study table: every arm (frozen classifiers, fine-tuned model) on the same test rows of one plan.

    Per arm: ROC-AUC, accuracy, F1, sensitivity/specificity at the operating points each run chose on
    its training side, Brier and ECE, with patient-clustered bootstrap 95% CIs. Each arm is compared
    with the reference on the paired rows: AUC difference with DeLong's p-value and the bootstrap CI
    of the difference, Brier difference likewise. Arms scored on different rows are refused. Written
    to the store (SQL view `study`).
    """
    from cxr_embed import evaluation
    from cxr_embed.classifiers import parse_models
    from cxr_embed.store import Store
    from cxr_embed.study import StudyConfig, run_study

    settings = None
    if split or where or sample:
        settings = evaluation.ClassifyConfig(split=split or "cv", folds=folds, test_fraction=test_fraction, seed=seed,
                                             where=where, sample=sample).plan_settings()
    config = StudyConfig(plan_id=plan, settings=settings, models=tuple(parse_models(models)) if models else None,
                         finetune_run=finetune_run, target=target, reference=reference, n_boot=n_boot, seed=seed,
                         plots=plots)
    result = run_study(Store.open(store), config)
    if json_out:
        emit_json({"study_id": result.study_id, "plan_id": result.plan_id, "target": result.target,
                   "n_images": result.n_images, "n_patients": result.n_patients, "reference": result.reference,
                   "table": result.table(), "comparisons": result.comparisons, "figures": result.figures, "notes": result.notes})
        return
    print_table(study_rows(result.table()),
                title=f"Study on plan {result.plan_id}: {result.n_images} images of {result.n_patients} patients "
                      f"(prevalence {result.prevalence:.2f}), every arm on the same rows; 95% CIs resample patients; "
                      f"paired tests vs {result.reference}")
    warn_all(result.notes)
    if result.figures:
        info(f"figures: {', '.join(result.figures)}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("classify")(classify)
    app.command("study")(study)
    app.command("predict")(predict)
