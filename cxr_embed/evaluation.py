"""Leak-free evaluation of classifiers on a store: folds, leakage check, calibration, results.

The rules this module enforces, and why:

* **Folds are grouped by patient** (and stratified by label). ChestX-ray14 has 8,504 patients with
  both normal and abnormal images; an image-level split puts a patient's follow-up scans on both
  sides and inflates every metric. :func:`check_leakage` counts patients shared by train and test in
  every fold and raises :class:`EvaluationError` unless all counts are 0. Rows without a patient id
  are their own group.
* **Nothing is tuned on the test fold.** Inside each training fold a patient-disjoint *held-out
  slice* (20 % of training patients, at most ``max_holdout`` rows) is set aside: the classifier fits
  on the rest, and the slice serves hyper-parameter choice/early stopping, post-hoc calibration
  (Platt, isotonic, temperature) and the operating points (Youden J, 90 % sensitivity), which are
  then only *applied* to the test fold.
* **Pooled** metrics (fold -1) are computed on the out-of-fold predictions of all folds; pooled
  decisions use each row's own fold thresholds.

Results go to the store's ``predictions``/``metrics``/``runs`` tables (schemas in
docs/ARCHITECTURE.md) through :func:`write_results`, which ``finetune`` reuses.
"""

from __future__ import annotations

import json
import platform
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cxr_embed import classifier_files, metrics
from cxr_embed import classifiers as clf
from cxr_embed.errors import ConfigError, EvaluationError
from cxr_embed.progress import progress_bar
from cxr_embed.records import FINDINGS
from cxr_embed.store import RESULT_SCHEMAS

CALIBRATIONS = ("none", "platt", "isotonic", "temperature")
AGE_BANDS = ((0, 40, "<40"), (40, 60, "40-59"), (60, 80, "60-79"), (80, 200, "80+"))


# --------------------------------------------------------------------------------------- folds


@dataclass(frozen=True)
class Fold:
    """Row indices (into the evaluated rows) of one train/test split."""

    index: int
    train: np.ndarray
    test: np.ndarray


def group_ids(patients: Sequence[Any]) -> np.ndarray:
    """Integer group per row from patient ids; a missing id (None/NaN/"") becomes its own group."""
    out = np.empty(len(patients), dtype=np.int64)
    codes: dict[Any, int] = {}
    for i, p in enumerate(patients):
        missing = p is None or p == "" or (isinstance(p, float) and np.isnan(p))
        out[i] = codes.setdefault(("__row__", i) if missing else p, len(codes))
    return out


def patient_group_folds(labels, groups, k: int = 5, seed: int = 0) -> list[Fold]:
    """``k`` folds stratified by label with every patient (group) in exactly one test fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(labels)
    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    if k < 2:
        raise ConfigError(f"--folds must be at least 2 (got {k}).")
    if n_groups < k:
        raise EvaluationError(f"Only {n_groups} patients for {k} folds; use fewer folds or more data.")
    if len(np.unique(y)) < 2:
        raise EvaluationError("Only one class among the labelled rows; ROC-AUC and the other metrics need both.")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [Fold(i, tr, te) for i, (tr, te) in enumerate(splitter.split(np.zeros(len(y)), y, groups))]


def official_split(splits: Sequence[str | None]) -> list[Fold]:
    """One fold: train on rows whose split is "train" (train_val), test on "test" (test_list)."""
    s = np.asarray([x or "" for x in splits])
    train, test = np.flatnonzero(s == "train"), np.flatnonzero(s == "test")
    if not len(train) or not len(test):
        raise EvaluationError(
            f"--split official needs rows marked train and test (found {len(train)} train, {len(test)} test); "
            "index ChestX-ray14 with its train_val_list.txt/test_list.txt, or use --split cv."
        )
    return [Fold(0, train, test)]


def shared_patients(folds: Sequence[Fold], groups) -> list[int]:
    """Number of patients (groups) present on both sides, per fold."""
    groups = np.asarray(groups)
    return [len(np.intersect1d(groups[f.train], groups[f.test])) for f in folds]


def check_leakage(folds: Sequence[Fold], groups) -> list[int]:
    """Return the per-fold shared-patient counts; raise :class:`EvaluationError` if any is not 0."""
    counts = shared_patients(folds, groups)
    if any(counts):
        detail = ", ".join(f"fold {f.index}: {c}" for f, c in zip(folds, counts, strict=True))
        raise EvaluationError(
            f"Patient leakage: the same patients appear in training and test ({detail}). Metrics would be "
            "optimistic, so none are reported. Check the store's patient_id column (and the official lists)."
        )
    return counts


def holdout_slice(labels, groups, fraction: float = 0.2, max_rows: int = 10_000, seed: int = 0):
    """Split rows into ``(fit, held_out)`` index arrays, patient-disjoint, stratified when possible.

    The held-out slice is what calibration and operating points are fitted on; capping it keeps
    most of the training data for the classifier on large stores (10k rows pin a threshold well).
    """
    y, groups = np.asarray(labels), np.asarray(groups)
    frac = min(fraction, max_rows / max(len(y), 1))
    k = int(np.clip(round(1 / max(frac, 1e-9)), 2, 1000))
    if len(np.unique(groups)) < k or len(np.unique(y)) < 2:
        return np.arange(len(y)), np.empty(0, dtype=np.int64)
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

    if len(np.unique(groups)) > 5000:  # StratifiedGroupKFold's greedy loop is slow on many groups and k
        fit, held = next(GroupShuffleSplit(1, test_size=1 / k, random_state=seed).split(y, y, groups))
    else:
        fit, held = next(StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(y, y, groups))
    if len(np.unique(y[held])) < 2 or len(np.unique(y[fit])) < 2:
        return np.arange(len(y)), np.empty(0, dtype=np.int64)
    return fit, held


# --------------------------------------------------------------------------------- calibration


@dataclass
class Calibrator:
    """Post-hoc map from a classifier's probability to a calibrated one, fitted on held-out rows.

    ``platt``: sigmoid(a*logit(p)+b); ``temperature``: sigmoid(logit(p)/T) (one parameter, keeps
    the ranking and the 0.5 point); ``isotonic``: monotone step function (sklearn).
    """

    method: str
    a: float = 1.0
    b: float = 0.0
    isotonic: Any = None

    def __call__(self, p: np.ndarray) -> np.ndarray:
        p = np.asarray(p, dtype=np.float64)
        if self.method == "isotonic":
            return np.clip(self.isotonic.predict(p), 0.0, 1.0)
        return clf._sigmoid(self.a * _logit(p) + self.b)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def fit_calibrator(method: str, p, y) -> Calibrator | None:
    """Fit ``method`` on held-out probabilities ``p`` with labels ``y``; None for "none"."""
    if method not in CALIBRATIONS:
        raise ConfigError(f"Unknown calibration {method!r}; choose from {', '.join(CALIBRATIONS)}.")
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y)
    if method == "none" or len(p) == 0 or len(np.unique(y)) < 2:
        return None
    if method == "platt":
        a, b = clf._platt(_logit(p), y)
        return Calibrator("platt", a, b)
    if method == "temperature":
        from scipy.optimize import minimize_scalar

        z = _logit(p)

        def nll(log_t: float) -> float:
            q = np.clip(clf._sigmoid(z / np.exp(log_t)), 1e-12, 1 - 1e-12)
            return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))

        log_t = minimize_scalar(nll, bounds=(-5, 5), method="bounded").x
        return Calibrator("temperature", float(np.exp(-log_t)), 0.0)
    from sklearn.isotonic import IsotonicRegression

    return Calibrator("isotonic", isotonic=IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(p, y))


# ------------------------------------------------------------------------------- fitted models


@dataclass
class FittedModel:
    """A classifier plus its calibrator and operating points: everything ``predict`` applies."""

    name: str
    classifier: Any
    calibrator: Calibrator | None
    thresholds: dict[str, float]
    heldout_y: np.ndarray
    heldout_prob: np.ndarray

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        p = self.classifier.predict_proba(X)
        return self.calibrator(p) if self.calibrator is not None else np.asarray(p, dtype=np.float64)

    def decisions(self, prob: np.ndarray) -> dict[str, np.ndarray]:
        """Boolean "abnormal" calls at every operating point."""
        return {name: np.asarray(prob) >= thr for name, thr in self.thresholds.items()}


def fit_model(name: str, X, y, groups, calibration: str = "none", seed: int = 0, max_holdout: int = 10_000) -> FittedModel:
    """Fit classifier ``name`` on the training rows: held-out slice, classifier, calibrator, thresholds."""
    y = np.asarray(y).astype(np.int64)
    fit_idx, held = holdout_slice(y, groups, max_rows=max_holdout, seed=seed)
    model = clf.make_classifier(name, seed=seed)
    with clf.compute_threads(*np.shape(X)):
        return _fit_model(name, model, X, y, fit_idx, held, calibration)


def _fit_model(name: str, model, X, y, fit_idx: np.ndarray, held: np.ndarray, calibration: str) -> FittedModel:
    if len(held):
        model.fit(X[fit_idx], y[fit_idx], X[held], y[held])
        raw = model.predict_proba(X[held])
    else:  # too few patients to hold any out: thresholds from training predictions (optimistic)
        model.fit(X, y)
        held, raw = np.arange(len(y)), model.predict_proba(X)
    calibrator = fit_calibrator(calibration, raw, y[held])
    prob = calibrator(raw) if calibrator is not None else np.asarray(raw, dtype=np.float64)
    return FittedModel(name, model, calibrator, metrics.operating_points(y[held], prob), y[held], prob)


# ------------------------------------------------------------------------------------- CV runs


@dataclass
class ModelResult:
    """One classifier on one target: out-of-fold predictions and metrics per fold and pooled."""

    classifier: str
    target: str
    rows: np.ndarray  # evaluated row positions (into the store)
    labels: np.ndarray
    prob: np.ndarray  # out-of-fold probability per evaluated row
    fold: np.ndarray  # test fold of each evaluated row
    per_fold: list[metrics.BinaryMetrics]
    pooled: metrics.BinaryMetrics
    fold_thresholds: list[dict[str, float]]
    seconds: float

    def pooled_decisions(self) -> dict[str, np.ndarray]:
        """Each row called at its own fold's operating points."""
        out = {}
        for name in self.fold_thresholds[0]:
            thr = np.array([t[name] for t in self.fold_thresholds])[self.fold]
            out[name] = self.prob >= thr
        return out


def pooled_metrics(y, prob, fold, fold_thresholds: list[dict[str, float]], n_boot: int, seed: int) -> metrics.BinaryMetrics:
    """Metrics on all out-of-fold predictions; threshold metrics use each row's fold thresholds."""
    values = metrics.binary_report(y, prob)
    for name in fold_thresholds[0] if fold_thresholds else []:
        thr = np.array([t[name] for t in fold_thresholds])[fold]
        values.update({f"{k}@{name}": v for k, v in metrics.decision_metrics(y, prob >= thr).items()})
    auc, low, high = metrics.roc_auc_ci(y, prob, n_boot=n_boot, seed=seed)
    values["roc_auc"] = auc
    return metrics.BinaryMetrics(values, (low, high), {})


def cross_validate(
    X: np.ndarray,
    y,
    groups,
    folds: Sequence[Fold],
    model_names: Sequence[str],
    *,
    target: str = "abnormal",
    calibration: str = "none",
    seed: int = 0,
    n_boot: int = 1000,
    fold_n_boot: int = 200,
    progress: bool = False,
    rows: np.ndarray | None = None,
) -> list[ModelResult]:
    """Run every classifier over ``folds`` after the leakage check; one :class:`ModelResult` each."""
    y = np.asarray(y).astype(np.int64)
    groups = np.asarray(groups)
    check_leakage(folds, groups)
    rows = np.arange(len(y)) if rows is None else rows
    results = []
    with progress_bar(len(folds) * len(model_names), f"classify {target}", enabled=progress) as bar:
        for name in model_names:
            start = time.perf_counter()
            prob = np.empty(len(y))
            fold_of = np.empty(len(y), dtype=np.int64)
            per_fold, thresholds = [], []
            for f in folds:
                bar.note(f"{name} fold {f.index}")
                fitted = fit_model(name, X[f.train], y[f.train], groups[f.train], calibration, seed + f.index)
                with clf.compute_threads(len(f.test), X.shape[1]):
                    p = fitted.predict_proba(X[f.test])
                prob[f.test], fold_of[f.test] = p, f.index
                thresholds.append(fitted.thresholds)
                per_fold.append(
                    metrics.evaluate_binary(y[f.test], p, fitted.heldout_y, fitted.heldout_prob, n_boot=fold_n_boot, seed=seed)
                )
                bar.advance()
            test_idx = np.sort(np.concatenate([f.test for f in folds]))
            fold_local = np.searchsorted([f.index for f in folds], fold_of[test_idx])
            pooled = pooled_metrics(y[test_idx], prob[test_idx], fold_local, thresholds, n_boot, seed)
            results.append(
                ModelResult(
                    name, target, rows[test_idx], y[test_idx], prob[test_idx], fold_of[test_idx],
                    per_fold, pooled, thresholds, time.perf_counter() - start,
                )
            )
    return results


def age_band(age: float | None) -> str | None:
    if age is None or (isinstance(age, float) and np.isnan(age)):
        return None
    return next((name for lo, hi, name in AGE_BANDS if lo <= age < hi), None)


def subgroup_table(results: Sequence[ModelResult], meta: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """ROC-AUC, Brier and 90 %-sensitivity-point sensitivity/specificity by sex, age band and view.

    ``meta`` holds per-store-row arrays ``sex``, ``age``, ``view``. A subgroup with one class gets
    NaN ROC-AUC rather than being hidden, so gaps in the data stay visible.
    """
    attrs = {
        "sex": meta.get("sex"),
        "age_band": np.array([age_band(a) for a in meta["age"]], dtype=object) if "age" in meta else None,
        "view": meta.get("view"),
    }
    out = []
    for r in results:
        calls = r.pooled_decisions().get("sens90")
        for attr, values in attrs.items():
            if values is None:
                continue
            v = np.asarray(values, dtype=object)[r.rows]
            for level in sorted({x for x in v if x is not None and x == x}, key=str):
                m = v == level
                row = {
                    "classifier": r.classifier, "target": r.target, "attribute": attr, "group": str(level),
                    "n": int(m.sum()), "prevalence": float(r.labels[m].mean()),
                    "roc_auc": metrics.roc_auc(r.labels[m], r.prob[m]), "brier": metrics.brier(r.labels[m], r.prob[m]),
                }
                if calls is not None:
                    d = metrics.decision_metrics(r.labels[m], calls[m])
                    row["sensitivity@sens90"], row["specificity@sens90"] = d["sensitivity"], d["specificity"]
                out.append(row)
    return out


# ----------------------------------------------------------------------------- result tables

def new_run_id(kind: str) -> str:
    """Sortable, unique run id: ``<kind>-YYYYmmddTHHMMSS-<hex>``."""
    return f"{kind}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def versions() -> dict[str, str]:
    """Library versions recorded with every run (reproducibility)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("cxr-embed", "numpy", "scikit-learn", "torch", "faiss-cpu", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def predictions_table(run_id: str, arm: str, classifier: str, target: str, fold, row_id, image_id, prob, label) -> pa.Table:
    """Rows of the ``predictions`` table (``row_id`` may be None when the row is not in a store)."""
    n = len(prob)
    return pa.Table.from_pydict(
        {
            "run_id": [run_id] * n, "arm": [arm] * n, "classifier": [classifier] * n, "target": [target] * n,
            "fold": np.asarray(fold, dtype=np.int32), "row_id": pa.array(row_id, pa.int64()) if row_id is not None else pa.nulls(n, pa.int64()),
            "image_id": pa.array(image_id, pa.string()), "probability": np.asarray(prob, dtype=np.float64),
            "label": np.asarray(label, dtype=np.int8),
        },
        schema=RESULT_SCHEMAS["predictions"],
    )


def metrics_table(run_id: str, arm: str, classifier: str, target: str, fold: int, result: metrics.BinaryMetrics | list) -> pa.Table:
    """Rows of the ``metrics`` table from a :class:`BinaryMetrics` (or ``(metric, value, lo, hi)`` rows)."""
    rows = result.rows() if isinstance(result, metrics.BinaryMetrics) else list(result)
    n = len(rows)
    return pa.Table.from_pydict(
        {
            "run_id": [run_id] * n, "arm": [arm] * n, "classifier": [classifier] * n, "target": [target] * n,
            "fold": pa.array([fold] * n, pa.int32()), "metric": [r[0] for r in rows],
            "value": pa.array([r[1] for r in rows], pa.float64()),
            "ci_low": pa.array([r[2] for r in rows], pa.float64()),
            "ci_high": pa.array([r[3] for r in rows], pa.float64()),
        },
        schema=RESULT_SCHEMAS["metrics"],
    )


def result_metrics_tables(run_id: str, arm: str, result: ModelResult, fold_indices: Sequence[int]) -> list[pa.Table]:
    """``metrics`` rows of one :class:`ModelResult`: every fold, then pooled (fold -1)."""
    tables = [metrics_table(run_id, arm, result.classifier, result.target, i, m)
              for i, m in zip(fold_indices, result.per_fold, strict=True)]
    return [*tables, metrics_table(run_id, arm, result.classifier, result.target, -1, result.pooled)]


SUBGROUP_METRICS = ("n", "prevalence", "roc_auc", "brier", "sensitivity@sens90", "specificity@sens90")


def subgroup_metrics_tables(run_id: str, arm: str, subgroups: Sequence[dict[str, Any]]) -> list[pa.Table]:
    """:func:`subgroup_table` rows as pooled ``metrics`` rows named ``subgroup:<attribute>=<group>:<metric>``."""
    return [
        metrics_table(run_id, arm, s["classifier"], s["target"], -1,
                      [(f"subgroup:{s['attribute']}={s['group']}:{k}", float(s[k]), None, None) for k in SUBGROUP_METRICS if k in s])
        for s in subgroups
    ]


def write_results(store, run_id: str, kind: str, params: dict, timings: dict,
                  predictions: Sequence[pa.Table], metric_tables: Sequence[pa.Table]) -> None:
    """Append one run (its predictions, metrics and the ``runs`` row) to the store's result tables.

    Shared with ``finetune``: build the tables with :func:`predictions_table` / :func:`metrics_table`
    (``arm="finetuned"``) and call this once per run.
    """
    if predictions:
        store.write_results("predictions", pa.concat_tables(predictions))
    if metric_tables:
        store.write_results("metrics", pa.concat_tables(metric_tables))
    run = pa.Table.from_pydict(
        {
            "run_id": [run_id], "kind": [kind], "created_at": [datetime.now(timezone.utc)],
            "params": [json.dumps(params, default=str)], "versions": [json.dumps(versions())],
            "timings": [json.dumps(timings)],
        },
        schema=RESULT_SCHEMAS["runs"],
    )
    store.write_results("runs", run)


# ----------------------------------------------------------------------------- store driver


@dataclass
class ClassifyConfig:
    """Options of ``cxr-embed classify`` (defaults documented in the README)."""

    models: tuple[str, ...] = clf.CLASSIFIER_NAMES
    folds: int = 5
    label: str = "abnormal"  # "abnormal" | a finding | "all-findings"
    split: str = "cv"  # "cv" | "official"
    calibration: str = "none"
    seed: int = 0
    n_boot: int = 1000
    refit: bool = True
    plots: bool = True
    progress: bool = False


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

    def summary(self) -> list[dict[str, Any]]:
        """The study-shaped table: one row per (target, classifier) with pooled metrics."""
        out = []
        for r in self.results:
            v = r.pooled.values
            out.append({
                "target": r.target, "classifier": r.classifier, "roc_auc": v["roc_auc"],
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


def _column(meta: pa.Table, name: str) -> np.ndarray:
    return np.asarray(meta.column(name).to_pylist(), dtype=object) if name in meta.column_names else None


def classify_store(store, config: ClassifyConfig) -> ClassifyRun:
    """Cross-validate the configured classifiers on a store and write everything back into it."""
    models = tuple(clf.parse_models(",".join(config.models)))
    if config.split not in ("cv", "official"):
        raise ConfigError(f"Unknown --split {config.split!r}; use cv or official.")
    if len(store) == 0:
        raise EvaluationError("The store is empty; index some images first (`cxr-embed index`).")
    fit_calibrator(config.calibration, [], [])  # validates the name before any work
    targets = targets_for(config.label)
    start = time.perf_counter()
    X = store.embeddings()
    meta = store.metadata()
    cols = {c: _column(meta, c) for c in ("patient_id", "split", "image_id", "row_id", "sex", "age", "view")}
    groups_all = group_ids(list(cols["patient_id"]) if cols["patient_id"] is not None else [None] * len(X))
    run_id = new_run_id("classify")
    timings: dict[str, float] = {"load": time.perf_counter() - start}
    results: list[ModelResult] = []
    leakage: list[int] = []
    preds, mets, saved = [], [], []
    refits: dict[str, FittedModel] = {}
    per_model: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for target in targets:
        column = "label" if target == "abnormal" else target
        raw = _column(meta, column)
        if raw is None:
            raise EvaluationError(f"The store has no {column!r} column; it cannot be the classification target.")
        keep = np.flatnonzero(np.array([v is not None and v == v for v in raw]))
        if len(keep) < 10:
            raise EvaluationError(f"Only {len(keep)} rows have a {column!r} label; at least 10 are needed.")
        y = raw[keep].astype(np.int64)
        groups = groups_all[keep]
        positives = len(np.unique(groups[y == 1]))
        if len(targets) > 1 and min(positives, len(np.unique(groups[y == 0]))) < config.folds:
            skipped[target] = f"{positives} patients with {target}: too few for {config.folds} folds"
            continue
        if config.split == "official":
            folds = official_split(cols["split"][keep] if cols["split"] is not None else [None] * len(keep))
        else:
            folds = patient_group_folds(y, groups, config.folds, config.seed)
        leakage = check_leakage(folds, groups)
        res = cross_validate(
            X[keep], y, groups, folds, models, target=target, calibration=config.calibration,
            seed=config.seed, n_boot=config.n_boot, progress=config.progress, rows=keep,
        )
        results.extend(res)
        row_ids = cols["row_id"] if cols["row_id"] is not None else np.arange(len(X))
        for r in res:
            timings[f"{target}/{r.classifier}"] = r.seconds
            preds.append(predictions_table(run_id, "frozen", r.classifier, target, r.fold,
                                           row_ids[r.rows].astype(np.int64), cols["image_id"][r.rows], r.prob, r.labels))
            mets.extend(result_metrics_tables(run_id, "frozen", r, [f.index for f in folds]))
        if config.refit:
            t0 = time.perf_counter()
            for name in models:
                fitted = fit_model(name, X[keep], y, groups, config.calibration, config.seed)
                cv = next(r for r in res if r.classifier == name)
                refits[model_name(name, target)] = fitted
                per_model[model_name(name, target)] = {"target": target, "cv_metrics": {k: v for k, v in cv.pooled.values.items() if v == v}}
            timings[f"{target}/refit"] = time.perf_counter() - t0
    if not results:
        raise EvaluationError(f"No target could be evaluated: {'; '.join(skipped.values())}.")
    if refits:
        meta = {**classifier_files.model_identity(store), "calibration": config.calibration, "versions": versions()}
        saved = [str(p) for p in classifier_files.save_run_classifiers(store.path, run_id, refits, meta, per_model)]
    subgroups = subgroup_table(results, {k: cols[k] for k in ("sex", "age", "view") if cols[k] is not None})
    mets.extend(subgroup_metrics_tables(run_id, "frozen", subgroups))
    plot_files: list[str] = []
    if config.plots:
        from cxr_embed import plots

        t0 = time.perf_counter()
        plot_files = [str(p) for p in plots.plot_run(Path(store.path) / "plots" / run_id, results)]
        timings["plots"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start
    params = {
        "models": list(models), "folds": config.folds if config.split == "cv" else 1, "label": config.label, "split": config.split,
        "calibration": config.calibration, "seed": config.seed, "n_boot": config.n_boot, "leakage": leakage,
        "model_id": store.model_id, "checkpoint_sha256": store.checkpoint_sha256, "rows": len(X),
        "skipped_targets": skipped,
    }
    write_results(store, run_id, "classify", params, timings, preds, mets)
    return ClassifyRun(run_id, results, subgroups, leakage, saved, plot_files, timings, skipped)


# ------------------------------------------------------------------------ saving and predict


def model_name(classifier: str, target: str) -> str:
    """File stem under ``classifiers/``: ``svm`` for the abnormal target, ``svm-effusion`` otherwise."""
    return classifier if target == "abnormal" else f"{classifier}-{target}"


# ------------------------------------------------------------------------- synthetic cohorts


@dataclass
class SyntheticCohort:
    """Embeddings with a known label signal and ChestX-ray14-like patient structure."""

    embeddings: np.ndarray  # (N, D) float32, L2-normalised like MedImageInsight's
    labels: np.ndarray  # int8
    patients: np.ndarray  # str patient ids, ~3.6 images per patient
    sex: np.ndarray
    age: np.ndarray
    view: np.ndarray


def synthetic_cohort(n: int, dim: int = 1024, *, separation: float = 1.0, n_clusters: int = 32, seed: int = 0) -> SyntheticCohort:
    """Clustered synthetic embeddings for tests and benchmarks (no real data needed).

    Each patient belongs to one of ``n_clusters`` clusters (anatomy/scanner look-alikes) and has a
    latent risk; images of a patient share the cluster, a patient offset and most of the risk, which
    is what makes patient-level leakage matter. The label moves the embedding along a global
    direction (linear signal) and a cluster-specific one (non-linear signal). At 1024 dims,
    ``separation`` 1.4 gives a logistic-regression ROC-AUC of about 0.85 (0.848 at 60k rows; 1.0
    gives 0.79, 1.8 gives 0.90); 3.0 on few dims makes every classifier exceed 0.9.
    """
    rng = np.random.default_rng(seed)
    n_patients = max(2, round(n / 3.64))  # ChestX-ray14: 112,120 images of 30,805 patients
    patient = np.sort(rng.integers(0, n_patients, n))
    cluster_of_patient = rng.integers(0, n_clusters, n_patients)
    risk = rng.normal(0, 1, n_patients) + rng.normal(0, 0.7, n_clusters)[cluster_of_patient]
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-(1.5 * risk[patient] - 0.2)))).astype(np.int8)
    centres = rng.normal(0, 1.0, (n_clusters, dim)).astype(np.float32)
    direction = rng.normal(0, 1, dim).astype(np.float32)
    direction /= np.linalg.norm(direction)
    cluster_dirs = rng.normal(0, 1, (n_clusters, dim)).astype(np.float32)
    cluster_dirs /= np.linalg.norm(cluster_dirs, axis=1, keepdims=True)
    c = cluster_of_patient[patient]
    X = centres[c] * 0.35
    X += rng.normal(0, 0.25, (n_patients, dim)).astype(np.float32)[patient]
    X += rng.normal(0, 1.0, (n, dim)).astype(np.float32)
    signed = (y.astype(np.float32) - 0.5)[:, None]
    X += signed * separation * (1.0 * direction + 0.9 * cluster_dirs[c])
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    sex = np.where(rng.uniform(size=n_patients) < 0.56, "M", "F")[patient]
    age = np.clip(rng.normal(47, 17, n_patients), 1, 95).round()[patient].astype(np.float32)
    view = np.where(rng.uniform(size=n) < 0.6, "PA", "AP")
    return SyntheticCohort(np.ascontiguousarray(X, dtype=np.float32), y, np.array([f"p{p:06d}" for p in patient]), sex, age, view)
