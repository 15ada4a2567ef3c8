"""Uncertainty for the study: patient-clustered bootstrap CIs and DeLong's paired ROC-AUC test.

Why clustered: ChestX-ray14 has ~3.7 images per patient and a patient's images are correlated
(same anatomy, same disease course). Resampling *images* treats them as independent and gives
intervals that are too narrow; resampling *patients* (all of a patient's images together) is the
honest unit. Every CI cxr-embed reports comes from :func:`bootstrap_cis` with the patient codes as
``clusters``, and the unit is written into the run's parameters (``bootstrap_unit``).

A bootstrap replicate is a vector of per-row weights (how often the row's patient was drawn), so
each metric is a weighted sum over the original arrays: scores are sorted once, never re-sampled.

DeLong's test (:func:`delong_paired`) compares two correlated ROC-AUCs on the same rows with the
O(n log n) mid-rank formulation (Sun & Xu, 2014). It assumes independent images; with several
images per patient its p-value is somewhat optimistic, which is why the study reports the
patient-clustered bootstrap CI of the difference beside it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

#: Bootstrap units recorded in run parameters.
PATIENT, IMAGE = "patient", "image"


def cluster_codes(clusters: np.ndarray | None, n: int) -> np.ndarray:
    """Integer cluster code per row (``None``: every row is its own cluster, i.e. image-level)."""
    if clusters is None:
        return np.arange(n)
    _, codes = np.unique(np.asarray(clusters), return_inverse=True)
    return codes.ravel()


def bootstrap_weights(
    clusters: np.ndarray | None, n: int, n_boot: int, seed: int = 0
) -> Iterator[np.ndarray]:
    """``n_boot`` per-row weight vectors: each draws as many clusters as there are, with replacement."""
    codes = cluster_codes(clusters, n)
    n_clusters = int(codes.max()) + 1 if n else 0
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        draws = np.bincount(rng.integers(0, n_clusters, n_clusters), minlength=n_clusters)
        yield draws[codes].astype(np.float64)


def weighted_auc(rank: np.ndarray, n_ranks: int, y: np.ndarray, w: np.ndarray) -> float:
    """ROC-AUC (ties count 1/2) with row weights; ``rank`` = index of each score among the unique scores."""
    pos = np.bincount(rank, weights=w * y, minlength=n_ranks)
    neg = np.bincount(rank, weights=w * (1 - y), minlength=n_ranks)
    wp, wn = pos.sum(), neg.sum()
    if wp == 0 or wn == 0:
        return float("nan")
    return float((pos * (np.cumsum(neg) - 0.5 * neg)).sum() / (wp * wn))


def weighted_metrics(
    y: np.ndarray,
    p: np.ndarray,
    w: np.ndarray,
    rank: np.ndarray,
    n_ranks: int,
    decisions: Mapping[str, np.ndarray],
    n_bins: int = 10,
) -> dict[str, float]:
    """The study's metrics under row weights ``w`` (names as in :func:`cxr_embed.metrics.binary_report`)."""
    total = w.sum()
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    gap = np.bincount(bins, weights=w * (y - p), minlength=n_bins)
    out = {
        "roc_auc": weighted_auc(rank, n_ranks, y, w),
        "brier": float((w * (p - y) ** 2).sum() / total),
        "ece": float(np.abs(gap).sum() / total),
    }
    wy, wn = w * y, w * (1 - y)
    for name, pred in decisions.items():
        tp, fp = float(wy[pred].sum()), float(wn[pred].sum())
        fn, tn = float(wy.sum()) - tp, float(wn.sum()) - fp
        suffix = "" if name == "default" else f"@{name}"
        out[f"accuracy{suffix}"] = (tp + tn) / total
        out[f"f1{suffix}"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
        out[f"sensitivity{suffix}"] = tp / (tp + fn) if tp + fn else float("nan")
        out[f"specificity{suffix}"] = tn / (tn + fp) if tn + fp else float("nan")
    return out


def _percentiles(reps: dict[str, list[float]], level: float) -> dict[str, tuple[float, float]]:
    alpha = (1 - level) / 2
    out = {}
    for name, values in reps.items():
        v = np.asarray(values, dtype=np.float64)
        v = v[~np.isnan(v)]
        out[name] = (
            tuple(float(x) for x in np.quantile(v, [alpha, 1 - alpha])) if v.size else (np.nan, np.nan)
        )
    return out


def bootstrap_cis(
    y,
    p,
    *,
    clusters: np.ndarray | None = None,
    decisions: Mapping[str, np.ndarray] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile CIs of ROC-AUC, Brier, ECE and the decision metrics, resampling ``clusters``.

    ``decisions`` maps an operating-point name to boolean calls (``"default"`` = p >= 0.5 is added).
    Replicates that draw a single class give no AUC and are left out of its quantiles.
    """
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    calls = {"default": p >= 0.5, **{k: np.asarray(v, dtype=bool) for k, v in (decisions or {}).items()}}
    if n_boot <= 0 or y.size == 0:
        return {}
    uniq, rank = np.unique(p, return_inverse=True)
    reps: dict[str, list[float]] = {}
    for w in bootstrap_weights(clusters, y.size, n_boot, seed):
        for name, value in weighted_metrics(y, p, w, rank, uniq.size, calls).items():
            reps.setdefault(name, []).append(value)
    return _percentiles(reps, level)


def auc_ci(
    y, p, *, clusters: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Only the ROC-AUC CI (what the per-fold rows of a long classify run need; cheaper than all metrics)."""
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if n_boot <= 0 or y.size == 0:
        return float("nan"), float("nan")
    uniq, rank = np.unique(p, return_inverse=True)
    reps = [weighted_auc(rank, uniq.size, y, w) for w in bootstrap_weights(clusters, y.size, n_boot, seed)]
    return _percentiles({"roc_auc": reps}, level)["roc_auc"]


def paired_diff_cis(
    y, p_a, p_b, *, clusters: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """CIs of ``metric(a) - metric(b)`` for ROC-AUC and Brier, both arms scored on the same replicate."""
    y = np.asarray(y, dtype=np.float64).ravel()
    a, b = (np.asarray(x, dtype=np.float64).ravel() for x in (p_a, p_b))
    ua, ra = np.unique(a, return_inverse=True)
    ub, rb = np.unique(b, return_inverse=True)
    reps: dict[str, list[float]] = {"roc_auc": [], "brier": []}
    for w in bootstrap_weights(clusters, y.size, n_boot, seed):
        reps["roc_auc"].append(weighted_auc(ra, ua.size, y, w) - weighted_auc(rb, ub.size, y, w))
        reps["brier"].append(float((w * ((a - y) ** 2 - (b - y) ** 2)).sum() / w.sum()))
    return _percentiles(reps, level)


# --------------------------------------------------------------------------------------- DeLong


@dataclass(frozen=True)
class DeLongTest:
    """DeLong's paired comparison of two ROC-AUCs on the same rows."""

    auc_a: float
    auc_b: float
    var_a: float
    var_b: float
    cov: float
    z: float
    p_value: float

    @property
    def diff(self) -> float:
        return self.auc_a - self.auc_b


def delong_components(y, p) -> tuple[float, np.ndarray, np.ndarray]:
    """``(auc, V10, V01)``: the structural components by mid-ranks, O(n log n).

    ``V10[i]`` is the fraction of negatives positive ``i`` outranks (ties 1/2); ``V01[j]`` the
    fraction of positives that outrank negative ``j``. Both average to the AUC.
    """
    from scipy.stats import rankdata

    y = np.asarray(y).astype(np.int64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    pos, neg = p[y == 1], p[y == 0]
    m, n = pos.size, neg.size
    tz = rankdata(np.concatenate([pos, neg]))
    v10 = (tz[:m] - rankdata(pos)) / n
    v01 = 1.0 - (tz[m:] - rankdata(neg)) / m
    return float(v10.mean()), v10, v01


def delong_paired(y, p_a, p_b) -> DeLongTest:
    """Two-sided DeLong test of ``AUC(a) == AUC(b)`` for two scores of the same labelled rows."""
    from scipy.stats import norm

    y = np.asarray(y).astype(np.int64).ravel()
    m, n = int(y.sum()), int((1 - y).sum())
    if m < 2 or n < 2:
        nan = float("nan")
        return DeLongTest(nan, nan, nan, nan, nan, nan, nan)
    auc_a, v10_a, v01_a = delong_components(y, p_a)
    auc_b, v10_b, v01_b = delong_components(y, p_b)
    s = np.cov(np.vstack([v10_a, v10_b])) / m + np.cov(np.vstack([v01_a, v01_b])) / n
    var_diff = s[0, 0] + s[1, 1] - 2 * s[0, 1]
    if var_diff <= 1e-15:
        z, p_value = 0.0, 1.0
    else:
        z = (auc_a - auc_b) / np.sqrt(var_diff)
        p_value = float(2 * norm.sf(abs(z)))
    return DeLongTest(auc_a, auc_b, float(s[0, 0]), float(s[1, 1]), float(s[0, 1]), float(z), p_value)
