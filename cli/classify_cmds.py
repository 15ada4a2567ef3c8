"""CLI commands ``classify`` and ``predict``: options and output only; the work is in cxr_embed.evaluation."""

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
)

SUMMARY_COLUMNS = ("target", "classifier", "roc_auc", "ci_low", "ci_high", "accuracy", "f1", "brier", "ece",
                   "sensitivity@sens90", "specificity@sens90", "seconds")
SUBGROUP_COLUMNS = ("classifier", "target", "attribute", "group", "n", "prevalence", "roc_auc", "brier",
                    "sensitivity@sens90", "specificity@sens90")


@handle_errors
def classify(
    store: StoreOpt,
    models: Annotated[str, typer.Option("--models", "-m", help="Comma-separated classifiers: svm,lr,knn,rf,mlp.")] = "svm,lr,knn,rf,mlp",
    folds: Annotated[int, typer.Option("--folds", "-k", help="Cross-validation folds (patient-grouped, stratified).")] = 5,
    label: Annotated[str, typer.Option("--label", help="Target: abnormal (any finding), one finding (e.g. effusion), or all-findings (one-vs-rest for the 14).")] = "abnormal",
    split: Annotated[str, typer.Option("--split", help="cv: K patient-grouped folds; official: train on train_val, test on test_list.")] = "cv",
    calibration: Annotated[str, typer.Option("--calibration", help="Post-hoc calibration fitted inside the training folds: none, platt, isotonic, temperature.")] = "none",
    seed: Annotated[int, typer.Option("--seed", help="Seed for folds, held-out slices and the classifiers.")] = 0,
    n_boot: Annotated[int, typer.Option("--bootstrap", help="Bootstrap replicates for the pooled ROC-AUC 95% CI (0 = none).")] = 1000,
    refit: Annotated[bool, typer.Option("--refit/--no-refit", help="Refit each classifier on all rows and save it under classifiers/<run_id>/ (for `predict`).")] = True,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write ROC, precision-recall and reliability PNGs under plots/<run_id>/.")] = True,
    json_out: JsonOpt = False,
) -> None:
    """Cross-validate classifiers on the store's embeddings, leak-free, and save everything in the store.

    Folds never share a patient (checked: the run stops if any fold does). Operating points (Youden J,
    90% sensitivity) and calibration are fitted on a held-out slice of the training folds, never on the
    test fold. Predictions, metrics (per fold and pooled = fold -1, with subgroups) and the run's
    parameters/timings go to the store's predictions/metrics/runs tables (see `cxr-embed sql`).
    """
    from cxr_embed import evaluation
    from cxr_embed.classifiers import parse_models
    from cxr_embed.store import Store

    st = Store.open(store)
    config = evaluation.ClassifyConfig(
        models=tuple(parse_models(models)), folds=folds, label=label, split=split, calibration=calibration,
        seed=seed, n_boot=n_boot, refit=refit, plots=plots, progress=not json_out,
    )
    run = evaluation.classify_store(st, config)
    if json_out:
        emit_json({
            "run_id": run.run_id, "leakage": run.leakage, "summary": run.summary(), "subgroups": run.subgroups,
            "skipped_targets": run.skipped, "saved_models": run.saved_models, "plots": run.plots, "timings": run.timings,
        })
        return
    info(f"run {run.run_id}: shared patients per fold {run.leakage} (must be 0)")
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
        print_table(run.summary(), title=f"{label}: pooled out-of-fold metrics ({split})", columns=SUMMARY_COLUMNS)
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


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("classify")(classify)
    app.command("predict")(predict)
