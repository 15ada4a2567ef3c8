"""``cxr-embed classify``: the frozen-embedding arm of the study on a stored evaluation plan, and
the saved classifiers ``predict`` applies.

:func:`classify_store` is a short pipeline of small steps: resolve the plan (``plans``), load the
plan's rows, cross-validate every classifier per target (``crossval``), refit and save the models,
subgroups and plots, then one write of predictions/metrics/runs (``results``). Every row written
carries the plan id, so ``study`` can prove both arms were scored on the same images.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cxr_embed import classifier_files, stats
from cxr_embed import classifiers as clf
from cxr_embed.calibration import Calibrator, check_method
from cxr_embed.crossval import FittedModel, ModelResult, cross_validate, fit_model, subgroup_table
from cxr_embed.errors import ConfigError, EvaluationError
from cxr_embed.plans import SPLIT_ALIASES, Plan, PlanSettings, check_leakage, get_or_make_plan, group_ids
from cxr_embed.records import FINDINGS
from cxr_embed.results import (
    metrics_table,
    new_run_id,
    predictions_table,
    subgroup_metrics_tables,
    versions,
    write_results,
)

ARM = "frozen"
#: Re-exported for code that imported them from here before the split (``predict`` loads saved models into them).
__all__ = ["ARM", "Calibrator", "ClassifyConfig", "ClassifyRun", "FittedModel", "ModelResult", "classify_store",
           "model_name", "result_metrics_tables", "targets_for"]


@dataclass
class ClassifyConfig:
    """Options of ``cxr-embed classify`` (defaults documented in the README)."""

    models: tuple[str, ...] = clf.CLASSIFIER_NAMES
    folds: int = 5
    label: str = "abnormal"  # "abnormal" | a finding | "all-findings"
    split: str = "cv"  # "cv" (= kfold) | "holdout" | "official"
    test_fraction: float = 0.2  # hold-out plans only
    calibration: str = "none"
    seed: int = 0
    n_boot: int = 1000
    refit: bool = True
    plots: bool = True
    progress: bool = False
    plan_id: str | None = None  # an existing plan; else the plan with the settings above
    where: str | None = None  # SQL condition on the images view
    sample: int | None = None  # stratified whole-patient subset of about this many images

    def plan_settings(self) -> PlanSettings:
        if self.split not in SPLIT_ALIASES:
            raise ConfigError(f"Unknown --split {self.split!r}; use cv, holdout or official.")
        return PlanSettings(kind=SPLIT_ALIASES[self.split], folds=self.folds, test_fraction=self.test_fraction,
                            seed=self.seed, where=self.where, sample=self.sample)


@dataclass
class ClassifyRun:
    run_id: str
    results: list[ModelResult]
    subgroups: list[dict[str, Any]]
    leakage: list[int]
    saved_models: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # target -> why it was not evaluated
    plan_id: str | None = None
    plan: str = ""  # human description of the plan
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> list[dict[str, Any]]:
        """The study-shaped table: one row per (target, classifier) with pooled metrics."""
        out = []
        for r in self.results:
            v = r.pooled.values
            out.append({
                "target": r.target, "classifier": r.classifier, "n": int(v["n"]), "roc_auc": v["roc_auc"],
                "ci_low": r.pooled.auc_ci[0], "ci_high": r.pooled.auc_ci[1], "accuracy": v["accuracy"],
                "f1": v["f1"], "brier": v["brier"], "ece": v["ece"], "average_precision": v["average_precision"],
                "sensitivity@sens90": v.get("sensitivity@sens90"), "specificity@sens90": v.get("specificity@sens90"),
                "seconds": round(r.seconds, 2),
            })
        return out


def targets_for(label: str) -> list[str]:
    """Store columns evaluated for ``--label``: "abnormal" -> ``label``; "all-findings" -> the 14."""
    if label == "abnormal":
        return ["abnormal"]
    if label == "all-findings":
        return list(FINDINGS)
    if label in FINDINGS:
        return [label]
    raise ConfigError(f"Unknown --label {label!r}; use abnormal, all-findings or one of: {', '.join(FINDINGS)}.")


@dataclass
class _PlanRows:
    """The plan's rows of the store: embeddings, metadata columns and patient codes, in plan order."""

    plan: Plan
    X: np.ndarray
    columns: dict[str, np.ndarray]
    groups: np.ndarray


@dataclass
class _Outputs:
    """What the per-target steps accumulate for the one write at the end."""

    results: list[ModelResult] = field(default_factory=list)
    predictions: list[pa.Table] = field(default_factory=list)
    metrics: list[pa.Table] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)
    refits: dict[str, FittedModel] = field(default_factory=dict)  # file name -> refitted classifier
    per_model: dict[str, dict[str, Any]] = field(default_factory=dict)  # file name -> its own JSON fields
    skipped: dict[str, str] = field(default_factory=dict)
    leakage: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def _load_plan_rows(store, plan: Plan) -> _PlanRows:
    meta = store.metadata()
    pos = plan.positions(np.asarray(meta.column("row_id").to_numpy(), dtype=np.int64))
    taken = meta.take(pa.array(pos))
    columns = {c: np.asarray(taken.column(c).to_pylist(), dtype=object) for c in taken.column_names}
    return _PlanRows(plan, store.embeddings()[pos], columns, group_ids(list(columns["patient_id"])))


def _evaluate_target(data: _PlanRows, target: str, n_targets: int, models: Sequence[str], config: ClassifyConfig,
                     run_id: str, out: _Outputs) -> list[ModelResult]:
    """Cross-validate ``models`` on the plan rows labelled for ``target``; tables go into ``out``."""
    column = "label" if target == "abnormal" else target
    raw = data.columns.get(column)
    if raw is None:
        raise EvaluationError(f"The store has no {column!r} column; it cannot be the classification target.")
    keep = np.flatnonzero(np.array([v is not None and v == v for v in raw]))
    if len(keep) < 10:
        raise EvaluationError(f"Only {len(keep)} rows have a {column!r} label; at least 10 are needed.")
    y, groups = raw[keep].astype(np.int64), data.groups[keep]
    positives = len(np.unique(groups[y == 1]))
    n_folds = len(np.unique(data.plan.fold)) if data.plan.kind == "kfold" else 2
    if n_targets > 1 and min(positives, len(np.unique(groups[y == 0]))) < n_folds:
        out.skipped[target] = f"{positives} patients with {target}: too few for {n_folds} folds"
        return []
    folds = data.plan.folds(keep)
    out.leakage = check_leakage(folds, groups)
    res = cross_validate(data.X[keep], y, groups, folds, models, target=target, calibration=config.calibration,
                         seed=config.seed, n_boot=config.n_boot, progress=config.progress, rows=keep)
    plan = data.plan
    for r in res:
        out.timings[f"{target}/{r.classifier}"] = r.seconds
        out.predictions.append(predictions_table(run_id, ARM, r.classifier, target, r.fold, plan.row_id[r.rows],
                                                 plan.image_id[r.rows], r.prob, r.labels, plan_id=plan.plan_id,
                                                 prob_raw=r.prob_raw))
        out.metrics.extend(result_metrics_tables(run_id, ARM, r, [f.index for f in folds], plan_id=plan.plan_id))
    return res


def _refit_and_save(store, data: _PlanRows, target: str, models: Sequence[str], config: ClassifyConfig,
                    run_id: str, res: Sequence[ModelResult], out: _Outputs) -> None:
    """Refit every classifier on all of the plan's labelled rows and save it for ``predict``."""
    t0 = time.perf_counter()
    column = "label" if target == "abnormal" else target
    keep = np.flatnonzero(np.array([v is not None and v == v for v in data.columns[column]]))
    y, groups = data.columns[column][keep].astype(np.int64), data.groups[keep]
    for name in models:
        cv = next(r for r in res if r.classifier == name)
        file_name = model_name(name, target)
        out.refits[file_name] = fit_model(name, data.X[keep], y, groups, config.calibration, config.seed)
        out.per_model[file_name] = {"target": target,
                                    "cv_metrics": {k: v for k, v in cv.pooled.values.items() if v == v}}
    out.timings[f"{target}/refit"] = time.perf_counter() - t0


def result_metrics_tables(run_id: str, arm: str, result: ModelResult, fold_indices: Sequence[int], *,
                          plan_id: str | None = None) -> list[pa.Table]:
    """``metrics`` rows of one :class:`ModelResult`: every fold, then pooled (fold -1)."""
    tables = [metrics_table(run_id, arm, result.classifier, result.target, i, m, plan_id=plan_id)
              for i, m in zip(fold_indices, result.per_fold, strict=True)]
    return [*tables, metrics_table(run_id, arm, result.classifier, result.target, -1, result.pooled, plan_id=plan_id)]


def _plots(store, run_id: str, results: Sequence[ModelResult], out: _Outputs) -> list[str]:
    from cxr_embed import plots

    t0 = time.perf_counter()
    files = [str(p) for p in plots.plot_run(Path(store.path) / "plots" / run_id, results)]
    out.timings["plots"] = time.perf_counter() - t0
    return files


def classify_store(store, config: ClassifyConfig) -> ClassifyRun:
    """Cross-validate the configured classifiers on a store's plan and write everything back into it."""
    models = tuple(clf.parse_models(",".join(config.models)))
    check_method(config.calibration)  # validates the name before any work
    targets = targets_for(config.label)
    start = time.perf_counter()
    plan = get_or_make_plan(store, config.plan_settings(), config.plan_id)
    data = _load_plan_rows(store, plan)
    run_id = new_run_id("classify")
    out = _Outputs(timings={"load": time.perf_counter() - start})
    for target in targets:
        res = _evaluate_target(data, target, len(targets), models, config, run_id, out)
        out.results.extend(res)
        if res and config.refit:
            _refit_and_save(store, data, target, models, config, run_id, res, out)
    if not out.results:
        raise EvaluationError(f"No target could be evaluated: {'; '.join(out.skipped.values())}.")
    if out.refits:
        identity = {**classifier_files.model_identity(store), "calibration": config.calibration,
                    "plan_id": plan.plan_id, "versions": versions()}
        out.saved = [str(p) for p in
                     classifier_files.save_run_classifiers(store.path, run_id, out.refits, identity, out.per_model)]
    meta = {k: data.columns[k] for k in ("sex", "age", "view") if k in data.columns}
    subgroups = subgroup_table(out.results, meta, n_boot=min(config.n_boot, 200), seed=config.seed)
    out.metrics.extend(subgroup_metrics_tables(run_id, ARM, subgroups, plan_id=plan.plan_id))
    plot_files = _plots(store, run_id, out.results, out) if config.plots else []
    out.timings["total"] = time.perf_counter() - start
    warnings = [w for r in out.results for w in r.warnings]
    params = {
        "models": list(models), "plan_id": plan.plan_id, "plan": plan.settings.params(),
        "folds": len(plan.folds()), "label": config.label, "split": config.split,
        "calibration": config.calibration, "seed": config.seed, "n_boot": config.n_boot,
        "bootstrap_unit": stats.PATIENT, "leakage": out.leakage, "model_id": store.model_id,
        "checkpoint_sha256": store.checkpoint_sha256, "rows": len(plan), "skipped_targets": out.skipped,
    }
    write_results(store, run_id, "classify", params, out.timings, out.predictions, out.metrics, warnings)
    return ClassifyRun(run_id, out.results, subgroups, out.leakage, out.saved, plot_files, out.timings, out.skipped,
                       plan.plan_id, plan.describe(), warnings)


# ------------------------------------------------------------------------ saving and predict


def model_name(classifier: str, target: str) -> str:
    """File stem under ``classifiers/``: ``svm`` for the abnormal target, ``svm-effusion`` otherwise."""
    return classifier if target == "abnormal" else f"{classifier}-{target}"
