"""After training: best weights, temperature on validation, test metrics and result tables, export."""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit

from cxr_embed import metrics, stats
from cxr_embed.atomicio import write_json_atomic, write_parquet_atomic
from cxr_embed.calibration import fit_calibrator
from cxr_embed.crossval import ModelResult, subgroup_table
from cxr_embed.errors import EvaluationError
from cxr_embed.finetune.checkpoint import export_model
from cxr_embed.finetune.config import ARM, CLASSIFIER, FineTuneResult, TrainState
from cxr_embed.finetune.run import _load_best, _predict, _Run, _sizes
from cxr_embed.plans import group_ids
from cxr_embed.results import (
    FolderResults,
    metrics_table,
    predictions_table,
    subgroup_metrics_tables,
    write_results,
)


def _calibrate(run: _Run, y_val: np.ndarray, val_logits: np.ndarray) -> tuple[float, list[str]]:
    """Temperature on the validation rows; warnings (few rows, bound hit) go to the run and to stderr."""
    calibrator = fit_calibrator("temperature", expit(val_logits).ravel(), y_val.ravel().astype(np.int64))
    if calibrator is None:
        return 1.0, ["temperature scaling skipped: the validation rows hold a single class"]
    return float(calibrator.temperature), list(calibrator.warnings)


def _validation_metrics(run: _Run, y_val: np.ndarray, val_logits: np.ndarray) -> dict[str, dict[str, float]]:
    """Threshold-free validation metrics of the uncalibrated model (what a sweep selects on)."""
    out = {}
    for t, target in enumerate(run.names):
        yv = y_val[:, t].astype(np.int64)
        p = expit(val_logits[:, t])
        out[target] = {"roc_auc": metrics.roc_auc(yv, p), "brier": metrics.brier(yv, p), "n": float(len(yv))}
    return out


def _test_tables(
    run: _Run, val: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], temperature: float
) -> tuple[list, list, list, dict]:
    """Per target: predictions (calibrated + raw), metrics with patient-clustered CIs, ModelResults."""
    (val_idx, val_logits), (test_idx, test_logits) = val, test
    y_val, y_test = run.targets[val_idx], run.targets[test_idx]
    p_val, p_test, raw_test = (
        expit(val_logits / temperature),
        expit(test_logits / temperature),
        expit(test_logits),
    )
    row_ids = _store_row_ids(run, test_idx)
    image_ids = [run.dataset.records[i].image_id for i in test_idx]
    groups = group_ids([run.dataset.records[i].patient_id for i in test_idx])
    fold = np.full(len(test_idx), run.config.fold or 0, dtype=np.int64)
    plan_id = run.config.plan
    results, preds, mets, summary = [], [], [], {}
    for t, target in enumerate(run.names):
        yv, yt = y_val[:, t].astype(np.int64), y_test[:, t].astype(np.int64)
        if len(np.unique(yt)) < 2:
            continue  # a finding absent from the test split: no ROC-AUC to report
        two = len(np.unique(yv)) == 2
        m = metrics.evaluate_binary(
            yt,
            p_test[:, t],
            yv if two else None,
            p_val[:, t] if two else None,
            n_boot=run.config.n_boot,
            seed=run.config.seed,
            clusters=groups,
            all_cis=True,
        )
        summary[target] = dict(m.values)
        summary[target]["ci_low"], summary[target]["ci_high"] = m.auc_ci
        preds.append(
            predictions_table(
                run.run_id,
                ARM,
                CLASSIFIER,
                target,
                fold,
                row_ids,
                image_ids,
                p_test[:, t],
                yt,
                plan_id=plan_id,
                prob_raw=raw_test[:, t],
            )
        )
        # one test split: its fold, and (one-split plans) the same numbers as the pooled row
        for f in dict.fromkeys((int(fold[0]), -1 if run.config.fold is None else int(fold[0]))):
            mets.append(metrics_table(run.run_id, ARM, CLASSIFIER, target, f, m, plan_id=plan_id))
        results.append(
            ModelResult(
                CLASSIFIER,
                target,
                np.asarray(test_idx),
                yt,
                p_test[:, t],
                fold,
                [m],
                m,
                [m.thresholds],
                run.timings.get("train_s", 0.0),
                groups,
                raw_test[:, t],
            )
        )
    return results, preds, mets, summary


def _finish(run: _Run, state: TrainState, status: str) -> FineTuneResult:
    """Best weights → temperature on validation → test metrics, tables, plots → exported model folder.

    With ``evaluate_test`` off (a sweep cell) only the validation rows are scored: the test rows
    are touched once, for the cell the sweep selects.
    """
    started = time.perf_counter()
    _load_best(run)  # already EMA-averaged when EMA is on
    val = _predict(run, "val")
    y_val = run.targets[val[0]]
    temperature, warnings = _calibrate(run, y_val, val[1])
    val_metrics = _validation_metrics(run, y_val, val[1])
    results, preds, mets, summary, plot_files, model_dir = [], [], [], {}, [], None
    if run.config.evaluate_test:
        test = _predict(run, "test")
        if len(test[0]) == 0:
            raise EvaluationError("No test image could be decoded; see errors.parquet in the output folder.")
        results, preds, mets, summary = _test_tables(run, val, test, temperature)
        meta = {
            k: np.array([getattr(r, k) for r in run.dataset.records], dtype=object)
            for k in ("sex", "age", "view")
        }
        mets += subgroup_metrics_tables(
            run.run_id, ARM, subgroup_table(results, meta, seed=run.config.seed), plan_id=run.config.plan
        )
        from cxr_embed import plots

        plot_files = plots.plot_run(run.out / "plots" / run.run_id, results) if results else []
        model_dir = export_model(run, temperature, state)
    run.timings["finish_s"] = time.perf_counter() - started
    params = {
        **dataclasses.asdict(run.config),
        "status": status,
        "started_at": run.created_at,
        "plan_id": run.config.plan,
        "bootstrap_unit": stats.PATIENT,
        "best_epoch": state.best_epoch,
        "best_val_roc_auc": state.best_auc,
        "global_step": state.global_step,
        "temperature": temperature,
        "n_images": _sizes(run),
        "base_model_id": run.base.model_id,
        "validation": val_metrics,
        "base_checkpoint_sha256": run.base.checkpoint_sha256,
        "model_dir": str(model_dir) if model_dir else None,
        "history": state.history,
    }
    if run.config.evaluate_test:
        sinks: list[Any] = [FolderResults(run.out)]
        if run.config.store:
            from cxr_embed.store import Store

            sinks.append(Store.open(run.config.store))
        for sink in sinks:
            write_results(sink, run.run_id, "finetune", params, run.timings, preds, mets, warnings)
    _write_failures(run)
    result = FineTuneResult(
        status=status,
        run_id=run.run_id,
        out=run.out,
        state=state,
        model_dir=model_dir,
        temperature=temperature,
        test_metrics=summary,
        n_images=_sizes(run),
        failures=list(run.failures.values()),
        plots=[Path(p) for p in plot_files],
        warnings=warnings,
        val_metrics=val_metrics,
        plan_id=run.config.plan,
    )
    write_json_atomic(
        {k: v for k, v in dataclasses.asdict(result).items() if k != "state"}
        | {"history": state.history, "best_epoch": state.best_epoch, "best_val_roc_auc": state.best_auc},
        run.out / "result.json",
    )
    return result


def _store_row_ids(run: _Run, idx: np.ndarray) -> np.ndarray | None:
    """row_ids of the evaluated images in ``--store`` (matched by image_id); None without a store."""
    if not run.config.store:
        return None
    from cxr_embed.store import Store

    meta = Store.open(run.config.store).metadata(columns=["row_id", "image_id"])
    lookup = dict(zip(meta.column("image_id").to_pylist(), meta.column("row_id").to_pylist(), strict=True))
    return np.array([lookup.get(run.dataset.records[i].image_id) for i in idx], dtype=object)


def _write_failures(run: _Run) -> None:
    """``errors.parquet`` in the store's errors schema: every image that could not be read or decoded."""
    import pyarrow as pa

    from cxr_embed.store import ERRORS_SCHEMA

    rows = list(run.failures.values())
    now = [datetime.now(timezone.utc)] * len(rows)
    table = pa.table(
        {**{c: [r[c] for r in rows] for c in ("image_id", "path", "stage", "reason")}, "run_at": now},
        schema=ERRORS_SCHEMA,
    )
    write_parquet_atomic(table, run.out / "errors.parquet")
