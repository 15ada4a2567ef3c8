"""Binary-classification metrics shared by ``classify`` and ``finetune``.

Everything here is plain numpy on 1-D arrays of labels (0/1) and probabilities of the positive
class, so the frozen-embedding classifiers and the fine-tuned model are scored by the *same* code.

Why our own implementations rather than calling sklearn each time: the bootstrap CI of ROC-AUC
needs ~1000 AUCs per (classifier, fold); re-sorting 100k scores 1000 times is slow, so
:func:`roc_auc_ci` sorts once and re-weights (a bootstrap sample is a vector of multiplicities,
drawn per patient when ``clusters`` is given: see :mod:`cxr_embed.stats`).
The point estimates agree with sklearn (``tests/test_metrics.py`` checks it on random cases).

Operating points (Youden J, 90 % sensitivity) are thresholds, and thresholds chosen on the test
set make sensitivity/specificity optimistic. :func:`evaluate_binary` therefore takes them from
*training-side* predictions (``train_y``/``train_prob``) and only *applies* them to the test set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cxr_embed import stats
from cxr_embed.errors import EvaluationError

#: Sensitivity the triage operating point guarantees on the data it was chosen on.
TRIAGE_SENSITIVITY = 0.9


def _check(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(np.int64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise EvaluationError(f"{y.size} labels but {p.size} probabilities; they must match one to one.")
    if y.size and not np.isin(y, (0, 1)).all():
        raise EvaluationError("Labels must be 0 (normal) or 1 (abnormal).")
    return y, p


def _two_classes(y: np.ndarray) -> bool:
    return bool(y.size) and 0 < int(y.sum()) < y.size


def roc_auc(y, p) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count one half); NaN with a single class."""
    y, p = _check(y, p)
    if not _two_classes(y):
        return float("nan")
    uniq, rank = np.unique(p, return_inverse=True)
    return stats.weighted_auc(rank, uniq.size, y, np.ones(y.size))


def roc_auc_ci(y, p, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
               clusters: np.ndarray | None = None) -> tuple[float, float, float]:
    """ROC-AUC and its percentile bootstrap CI; ``clusters`` (patient codes) resamples whole patients.

    Returns ``(auc, low, high)``; the CI is NaN when ``n_boot`` is 0 or there is a single class.
    """
    y, p = _check(y, p)
    auc = roc_auc(y, p)
    if not _two_classes(y):
        return auc, float("nan"), float("nan")
    low, high = stats.auc_ci(y, p, clusters=clusters, n_boot=n_boot, seed=seed, level=level)
    return auc, low, high


def average_precision(y, p) -> float:
    """Average precision, sklearn's definition: sum over thresholds of (R_n - R_{n-1}) * P_n."""
    y, p = _check(y, p)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-p, kind="mergesort")
    ys, ps = y[order], p[order]
    last = np.r_[np.flatnonzero(np.diff(ps) != 0), ys.size - 1]  # last index of each distinct score
    tp = np.cumsum(ys)[last]
    precision = tp / (last + 1)
    recall_step = np.diff(np.r_[0, tp]) / n_pos
    return float((recall_step * precision).sum())


def brier(y, p) -> float:
    """Mean squared error of the probabilities (lower is better; the prior scores p(1-p))."""
    y, p = _check(y, p)
    return float(np.mean((p - y) ** 2)) if y.size else float("nan")


def confusion(y, pred) -> tuple[int, int, int, int]:
    """``(tp, fp, tn, fn)`` of boolean decisions ``pred`` (True = called abnormal)."""
    y = np.asarray(y).astype(np.int64).ravel()
    pred = np.asarray(pred, dtype=bool).ravel()
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    return tp, fp, int(np.sum(y == 0)) - fp, int(np.sum(y == 1)) - tp


def decision_metrics(y, pred) -> dict[str, float]:
    """Accuracy, F1 (positive class; 0 when undefined), sensitivity and specificity of decisions."""
    tp, fp, tn, fn = confusion(y, pred)
    n, f1_denom = tp + fp + tn + fn, 2 * tp + fp + fn
    return {
        "accuracy": (tp + tn) / n if n else float("nan"),
        "f1": 2 * tp / f1_denom if f1_denom else 0.0,
        "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
    }


def accuracy(y, p, threshold: float = 0.5) -> float:
    y, p = _check(y, p)
    return decision_metrics(y, p >= threshold)["accuracy"]


def f1(y, p, threshold: float = 0.5) -> float:
    y, p = _check(y, p)
    return decision_metrics(y, p >= threshold)["f1"]


def sensitivity_specificity(y, p, threshold: float) -> tuple[float, float]:
    y, p = _check(y, p)
    d = decision_metrics(y, p >= threshold)
    return d["sensitivity"], d["specificity"]


def _roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thresholds (distinct scores, descending) with the TPR and FPR of ``p >= threshold``."""
    order = np.argsort(-p, kind="mergesort")
    ys, ps = y[order], p[order]
    last = np.r_[np.flatnonzero(np.diff(ps) != 0), ys.size - 1]
    tp = np.cumsum(ys)[last]
    fp = (last + 1) - tp
    return ps[last], tp / max(int(y.sum()), 1), fp / max(int((1 - y).sum()), 1)


def youden_threshold(y, p) -> float:
    """Threshold maximising sensitivity + specificity - 1 (Youden's J)."""
    y, p = _check(y, p)
    if not _two_classes(y):
        return 0.5
    thr, tpr, fpr = _roc_points(y, p)
    return float(thr[int(np.argmax(tpr - fpr))])


def threshold_for_sensitivity(y, p, target: float = TRIAGE_SENSITIVITY) -> float:
    """Highest threshold whose sensitivity is at least ``target`` (the triage operating point)."""
    y, p = _check(y, p)
    if not _two_classes(y):
        return 0.5
    thr, tpr, _ = _roc_points(y, p)
    return float(thr[int(np.argmax(tpr >= target - 1e-12))])


def reliability_curve(y, p, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Equal-width bins on [0, 1]: ``(mean predicted, observed fraction positive, count)`` per non-empty bin."""
    y, p = _check(y, p)
    bins = np.clip((p * n_bins).astype(np.int64), 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    sum_p = np.bincount(bins, weights=p, minlength=n_bins)
    sum_y = np.bincount(bins, weights=y, minlength=n_bins)
    keep = count > 0
    return sum_p[keep] / count[keep], sum_y[keep] / count[keep], count[keep]


def expected_calibration_error(y, p, n_bins: int = 10) -> float:
    """ECE: count-weighted mean |observed - predicted| over equal-width probability bins."""
    y, p = _check(y, p)
    if not y.size:
        return float("nan")
    mean_p, frac, count = reliability_curve(y, p, n_bins)
    return float(np.sum(count * np.abs(frac - mean_p)) / y.size)


def binary_report(y, p, thresholds: dict[str, float] | None = None) -> dict[str, float]:
    """Threshold-free metrics plus accuracy/F1/sensitivity/specificity at each named threshold.

    ``thresholds`` maps a name (``"youden"``) to a value chosen elsewhere; ``"default"`` (0.5) is
    always included. Keys look like ``roc_auc``, ``accuracy``, ``sensitivity@youden``.
    """
    y, p = _check(y, p)
    out: dict[str, float] = {
        "n": float(y.size),
        "prevalence": float(y.mean()) if y.size else float("nan"),
        "roc_auc": roc_auc(y, p),
        "average_precision": average_precision(y, p),
        "brier": brier(y, p),
        "ece": expected_calibration_error(y, p),
    }
    for name, thr in {"default": 0.5, **(thresholds or {})}.items():
        suffix = "" if name == "default" else f"@{name}"
        out.update({f"{k}{suffix}": v for k, v in decision_metrics(y, p >= thr).items()})
        if name != "default":
            out[f"threshold@{name}"] = float(thr)
    return out


def operating_points(y, p) -> dict[str, float]:
    """The two operating points the reports use, chosen on ``(y, p)``: Youden J and 90 % sensitivity."""
    return {"youden": youden_threshold(y, p), "sens90": threshold_for_sensitivity(y, p)}


@dataclass
class BinaryMetrics:
    """One evaluation: metric values, their bootstrap CIs (by metric name) and the thresholds applied."""

    values: dict[str, float]
    cis: dict[str, tuple[float, float]] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)

    @property
    def auc_ci(self) -> tuple[float, float]:
        return self.cis.get("roc_auc", (float("nan"), float("nan")))

    def rows(self) -> list[tuple[str, float, float | None, float | None]]:
        """``(metric, value, ci_low, ci_high)`` rows as stored in the ``metrics`` table."""
        out = []
        for name, value in self.values.items():
            ci = self.cis.get(name, (None, None))
            out.append((name, float(value), ci[0], ci[1]))
        return out


def decisions_at(p, thresholds: dict[str, float]) -> dict[str, np.ndarray]:
    """Boolean calls ``p >= threshold`` at each named operating point."""
    p = np.asarray(p, dtype=np.float64)
    return {name: p >= thr for name, thr in thresholds.items()}


def evaluate_binary(
    y_true,
    prob,
    train_y=None,
    train_prob=None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    clusters: np.ndarray | None = None,
    all_cis: bool = False,
) -> BinaryMetrics:
    """Score test predictions; operating points come from ``(train_y, train_prob)`` when given.

    ``train_prob`` must be predictions on data the model did not fit on but that is not the test set
    (the training folds' held-out calibration slice, or a validation split). Without them only the
    0.5 threshold is reported, never thresholds tuned on the test set itself. ``clusters`` (patient
    codes) makes the bootstrap resample patients; ``all_cis`` adds CIs to every metric, not just ROC-AUC.
    """
    y, p = _check(y_true, prob)
    thresholds = operating_points(train_y, train_prob) if train_y is not None else {}
    values = binary_report(y, p, thresholds)
    if all_cis and _two_classes(y):
        cis = stats.bootstrap_cis(y, p, clusters=clusters, decisions=decisions_at(p, thresholds), n_boot=n_boot, seed=seed)
    else:
        cis = {"roc_auc": roc_auc_ci(y, p, n_boot=n_boot, seed=seed, clusters=clusters)[1:]}
    return BinaryMetrics(values=values, cis={k: v for k, v in cis.items() if k in values}, thresholds=thresholds)
