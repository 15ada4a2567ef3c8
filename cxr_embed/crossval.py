"""Cross-validation of the frozen-embedding classifiers over a plan's folds, and subgroup results.

Nothing is tuned on a test fold: inside each training fold a patient-disjoint *held-out slice*
(20 % of training patients, at most ``max_holdout`` rows) is set aside; the classifier fits on the
rest, and the slice serves hyper-parameter choice/early stopping, post-hoc calibration and the
operating points (Youden J, 90 % sensitivity), which are then only *applied* to the test fold.
**Pooled** metrics (fold -1) are computed on the out-of-fold predictions of all folds; pooled
decisions use each row's own fold thresholds. Every CI resamples patients (``stats``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxr_embed import classifiers as clf
from cxr_embed import metrics, stats
from cxr_embed.calibration import Calibrator, fit_calibrator
from cxr_embed.plans import Fold, check_leakage, holdout_slice
from cxr_embed.progress import progress_bar

AGE_BANDS = ((0, 40, "<40"), (40, 60, "40-59"), (60, 80, "60-79"), (80, 200, "80+"))


@dataclass
class FittedModel:
    """A classifier plus its calibrator and operating points: everything ``predict`` applies."""

    name: str
    classifier: Any
    calibrator: Calibrator | None
    thresholds: dict[str, float]
    heldout_y: np.ndarray
    heldout_prob: np.ndarray

    def predict_raw(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.classifier.predict_proba(X), dtype=np.float64)

    def calibrate(self, raw: np.ndarray) -> np.ndarray:
        return self.calibrator(raw) if self.calibrator is not None else raw

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.calibrate(self.predict_raw(X))

    def decisions(self, prob: np.ndarray) -> dict[str, np.ndarray]:
        """Boolean "abnormal" calls at every operating point."""
        return metrics.decisions_at(prob, self.thresholds)

    @property
    def warnings(self) -> list[str]:
        return list(self.calibrator.warnings) if self.calibrator is not None else []


def fit_model(
    name: str,
    X,
    y,
    groups,
    calibration: str = "none",
    seed: int = 0,
    max_holdout: int = 10_000,
    options: Mapping[str, Any] | None = None,
) -> FittedModel:
    """Fit classifier ``name`` on the training rows: held-out slice, classifier, calibrator, thresholds.

    ``options``: keyword arguments of the classifier beyond embeddings (the zero-shot prompt embeddings).
    """
    y = np.asarray(y).astype(np.int64)
    fit_idx, held = holdout_slice(y, groups, max_rows=max_holdout, seed=seed)
    model = clf.make_classifier(name, seed=seed, **(options or {}))
    with clf.compute_threads(*np.shape(X)):
        if len(held):
            model.fit(X[fit_idx], y[fit_idx], X[held], y[held])
            raw = model.predict_proba(X[held])
        else:  # too few patients to hold any out: thresholds from training predictions (optimistic)
            model.fit(X, y)
            held, raw = np.arange(len(y)), model.predict_proba(X)
    calibrator = fit_calibrator(calibration, raw, y[held])
    prob = calibrator(raw) if calibrator is not None else np.asarray(raw, dtype=np.float64)
    return FittedModel(name, model, calibrator, metrics.operating_points(y[held], prob), y[held], prob)


@dataclass
class ModelResult:
    """One classifier on one target: out-of-fold predictions and metrics per fold and pooled."""

    classifier: str
    target: str
    rows: np.ndarray  # evaluated row positions (into the store's metadata order)
    labels: np.ndarray
    prob: np.ndarray  # out-of-fold (calibrated) probability per evaluated row
    fold: np.ndarray  # test fold of each evaluated row
    per_fold: list[metrics.BinaryMetrics]
    pooled: metrics.BinaryMetrics
    fold_thresholds: list[dict[str, float]]
    seconds: float
    groups: np.ndarray | None = None  # patient code per evaluated row (the bootstrap's unit)
    prob_raw: np.ndarray | None = None  # before calibration
    warnings: tuple[str, ...] = ()

    def pooled_decisions(self) -> dict[str, np.ndarray]:
        """Each row called at its own fold's operating points."""
        folds = sorted(set(self.fold.tolist()))
        local = np.searchsorted(folds, self.fold)
        out = {}
        for name in self.fold_thresholds[0] if self.fold_thresholds else []:
            thr = np.array([t[name] for t in self.fold_thresholds])[local]
            out[name] = self.prob >= thr
        return out


def pooled_metrics(
    y,
    prob,
    fold,
    fold_thresholds: list[dict[str, float]],
    n_boot: int,
    seed: int,
    groups: np.ndarray | None = None,
) -> metrics.BinaryMetrics:
    """Metrics on all out-of-fold predictions with patient-clustered CIs for every metric; threshold
    metrics use each row's fold thresholds (``fold`` = position of the row's fold in ``fold_thresholds``)."""
    values = metrics.binary_report(y, prob)
    calls = {}
    for name in fold_thresholds[0] if fold_thresholds else []:
        calls[name] = prob >= np.array([t[name] for t in fold_thresholds])[fold]
        values.update({f"{k}@{name}": v for k, v in metrics.decision_metrics(y, calls[name]).items()})
    cis = stats.bootstrap_cis(y, prob, clusters=groups, decisions=calls, n_boot=n_boot, seed=seed)
    return metrics.BinaryMetrics(values, {k: v for k, v in cis.items() if k in values}, {})


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
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[ModelResult]:
    """Run every classifier over ``folds`` after the leakage check; one :class:`ModelResult` each.

    ``options``: per classifier name, its extra keyword arguments (see :func:`fit_model`).
    """
    y = np.asarray(y).astype(np.int64)
    groups = np.asarray(groups)
    check_leakage(folds, groups)
    rows = np.arange(len(y)) if rows is None else rows
    test_idx = np.sort(np.concatenate([f.test for f in folds]))
    results = []
    with progress_bar(len(folds) * len(model_names), f"classify {target}", enabled=progress) as bar:
        for name in model_names:
            start = time.perf_counter()
            prob, raw = np.full(len(y), np.nan), np.full(len(y), np.nan)
            fold_of = np.full(len(y), -1, dtype=np.int64)
            per_fold, thresholds, warnings = [], [], []
            for f in folds:
                bar.note(f"{name} fold {f.index}")
                fitted = fit_model(
                    name,
                    X[f.train],
                    y[f.train],
                    groups[f.train],
                    calibration,
                    seed + f.index,
                    options=(options or {}).get(name),
                )
                with clf.compute_threads(len(f.test), X.shape[1]):
                    raw[f.test] = fitted.predict_raw(X[f.test])
                prob[f.test], fold_of[f.test] = fitted.calibrate(raw[f.test]), f.index
                thresholds.append(fitted.thresholds)
                warnings += fitted.warnings
                per_fold.append(
                    metrics.evaluate_binary(
                        y[f.test],
                        prob[f.test],
                        fitted.heldout_y,
                        fitted.heldout_prob,
                        n_boot=fold_n_boot,
                        seed=seed,
                        clusters=groups[f.test],
                    )
                )
                bar.advance()
            if warnings:  # one line per classifier: the first fold's words, and how many folds had one
                warnings = [
                    f"{name}, {len(warnings)} warning(s) over {len(folds)} fold(s), e.g.: {warnings[0]}"
                ]
            fold_local = np.searchsorted([f.index for f in folds], fold_of[test_idx])
            bar.note(f"{name} pooled bootstrap ×{n_boot}")
            pooled = pooled_metrics(
                y[test_idx], prob[test_idx], fold_local, thresholds, n_boot, seed, groups[test_idx]
            )
            results.append(
                ModelResult(
                    name,
                    target,
                    rows[test_idx],
                    y[test_idx],
                    prob[test_idx],
                    fold_of[test_idx],
                    per_fold,
                    pooled,
                    thresholds,
                    time.perf_counter() - start,
                    groups[test_idx],
                    raw[test_idx],
                    tuple(warnings),
                )
            )
    return results


def age_band(age: float | None) -> str | None:
    if age is None or (isinstance(age, float) and np.isnan(age)):
        return None
    return next((name for lo, hi, name in AGE_BANDS if lo <= age < hi), None)


def subgroup_table(
    results: Sequence[ModelResult], meta: dict[str, np.ndarray], n_boot: int = 200, seed: int = 0
) -> list[dict[str, Any]]:
    """ROC-AUC (patient-clustered CI), Brier and 90 %-sensitivity-point sensitivity/specificity by sex,
    age band and view.

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
                auc, low, high = metrics.roc_auc_ci(
                    r.labels[m],
                    r.prob[m],
                    n_boot=n_boot,
                    seed=seed,
                    clusters=None if r.groups is None else r.groups[m],
                )
                row = {
                    "classifier": r.classifier,
                    "target": r.target,
                    "attribute": attr,
                    "group": str(level),
                    "n": int(m.sum()),
                    "prevalence": float(r.labels[m].mean()),
                    "roc_auc": auc,
                    "roc_auc_ci": (low, high),
                    "brier": metrics.brier(r.labels[m], r.prob[m]),
                }
                if calls is not None:
                    d = metrics.decision_metrics(r.labels[m], calls[m])
                    row["sensitivity@sens90"], row["specificity@sens90"] = d["sensitivity"], d["specificity"]
                out.append(row)
    return out
