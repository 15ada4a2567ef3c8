"""Uncertainty for the study: patient-clustered bootstrap CIs and DeLong's paired ROC-AUC test.

Why clustered: ChestX-ray14 has ~3.7 images per patient and a patient's images are correlated
(same anatomy, same disease course). Resampling *images* treats them as independent and gives
intervals that are too narrow; resampling *patients* (all of a patient's images together) is the
honest unit. Every CI cxr-embed reports comes from :func:`bootstrap_cis` with the patient codes as
``clusters``, and the unit is written into the run's parameters (``bootstrap_unit``).

A bootstrap replicate is how often each patient was drawn, so each metric is a weighted sum over
the original arrays: scores are ranked once, never re-sampled, and every metric but the ROC-AUC
is linear in the draws (per-patient sums times the draw counts: one matrix product per batch).

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


def cluster_draws(n_clusters: int, n_boot: int, seed: int = 0, batch: int = 64) -> Iterator[np.ndarray]:
    """Batches of bootstrap replicates: ``(b, n_clusters)`` counts of how often each cluster was drawn."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, batch):
        size = min(batch, n_boot - start)
        picks = rng.integers(0, n_clusters, (size, n_clusters))
        yield np.stack([np.bincount(row, minlength=n_clusters) for row in picks]).astype(np.float64)


def weighted_auc(rank: np.ndarray, n_ranks: int, y: np.ndarray, w: np.ndarray) -> float:
    """ROC-AUC (ties count 1/2) with row weights; ``rank`` = index of each score among the unique scores."""
    pos = np.bincount(rank, weights=w * y, minlength=n_ranks)
    neg = np.bincount(rank, weights=w * (1 - y), minlength=n_ranks)
    return _auc_from_counts(pos, neg)


def _auc_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
    wp, wn = pos.sum(), neg.sum()
    if wp == 0 or wn == 0:
        return float("nan")
    return float((pos * (np.cumsum(neg) - 0.5 * neg)).sum() / (wp * wn))


class _ClusteredAuc:
    """ROC-AUC of one score under cluster draws: scores ranked once, positives/negatives kept apart."""

    def __init__(self, y: np.ndarray, p: np.ndarray, codes: np.ndarray):
        uniq, rank = np.unique(p, return_inverse=True)
        self.n_ranks = uniq.size
        pos, neg = y == 1, y == 0
        self.pos_rank, self.pos_codes = rank[pos], codes[pos]
        self.neg_rank, self.neg_codes = rank[neg], codes[neg]

    def __call__(self, draws: np.ndarray) -> float:
        pos = np.bincount(self.pos_rank, weights=draws[self.pos_codes], minlength=self.n_ranks)
        neg = np.bincount(self.neg_rank, weights=draws[self.neg_codes], minlength=self.n_ranks)
        return _auc_from_counts(pos, neg)


def _per_cluster(
    codes: np.ndarray, n_clusters: int, columns: dict[str, np.ndarray]
) -> tuple[list[str], np.ndarray]:
    """Per-cluster sums of row quantities: every linear metric of a replicate is ``draws @ sums``."""
    names = list(columns)
    sums = np.stack([np.bincount(codes, weights=columns[k], minlength=n_clusters) for k in names], axis=1)
    return names, sums


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


def _linear_columns(
    y: np.ndarray, p: np.ndarray, calls: Mapping[str, np.ndarray], n_bins: int
) -> dict[str, np.ndarray]:
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    cols = {"one": np.ones_like(y), "y": y, "sq": (p - y) ** 2}
    for b in range(n_bins):
        cols[f"bin{b}"] = np.where(bins == b, y - p, 0.0)
    for name, pred in calls.items():
        cols[f"tp:{name}"], cols[f"fp:{name}"] = y * pred, (1 - y) * pred
    return cols


def _decision_values(tp, fp, wy, total) -> dict[str, np.ndarray]:
    fn, tn = wy - tp, (total - wy) - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "accuracy": (tp + tn) / total,
            "f1": np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0),
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
        }


def bootstrap_cis(
    y,
    p,
    *,
    clusters: np.ndarray | None = None,
    decisions: Mapping[str, np.ndarray] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    n_bins: int = 10,
) -> dict[str, tuple[float, float]]:
    """Percentile CIs of ROC-AUC, Brier, ECE and the decision metrics, resampling ``clusters``.

    ``decisions`` maps an operating-point name to boolean calls (``"default"`` = p >= 0.5 is added);
    names follow :func:`cxr_embed.metrics.binary_report` (``sensitivity@youden``). Replicates that
    draw a single class give no AUC and are left out of its quantiles. Everything but the AUC is
    linear in the draws, so it is computed per patient once and replicated by one matrix product.
    """
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if n_boot <= 0 or y.size == 0:
        return {}
    calls = {"default": p >= 0.5, **{k: np.asarray(v, dtype=bool) for k, v in (decisions or {}).items()}}
    codes = cluster_codes(clusters, y.size)
    n_clusters = int(codes.max()) + 1
    names, sums = _per_cluster(codes, n_clusters, _linear_columns(y, p, calls, n_bins))
    col = {k: i for i, k in enumerate(names)}
    auc = _ClusteredAuc(y, p, codes)
    reps: dict[str, list[float]] = {}
    for draws in cluster_draws(n_clusters, n_boot, seed):
        lin = draws @ sums
        total, wy = lin[:, col["one"]], lin[:, col["y"]]
        values = {
            "roc_auc": np.array([auc(d) for d in draws]),
            "brier": lin[:, col["sq"]] / total,
            "ece": np.abs(lin[:, [col[f"bin{b}"] for b in range(n_bins)]]).sum(axis=1) / total,
        }
        for name in calls:
            suffix = "" if name == "default" else f"@{name}"
            for metric, v in _decision_values(
                lin[:, col[f"tp:{name}"]], lin[:, col[f"fp:{name}"]], wy, total
            ).items():
                values[f"{metric}{suffix}"] = v
        for k, v in values.items():
            reps.setdefault(k, []).extend(v.tolist())
    return _percentiles(reps, level)


def auc_ci(
    y, p, *, clusters: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Only the ROC-AUC CI (what the per-fold rows of a long classify run need; cheaper than all metrics)."""
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if n_boot <= 0 or y.size == 0:
        return float("nan"), float("nan")
    codes = cluster_codes(clusters, y.size)
    auc = _ClusteredAuc(y, p, codes)
    reps = [auc(d) for draws in cluster_draws(int(codes.max()) + 1, n_boot, seed) for d in draws]
    return _percentiles({"roc_auc": reps}, level)["roc_auc"]


def paired_diff_cis(
    y, p_a, p_b, *, clusters: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """CIs of ``metric(a) - metric(b)`` for ROC-AUC and Brier, both arms scored on the same replicate."""
    y = np.asarray(y, dtype=np.float64).ravel()
    a, b = (np.asarray(x, dtype=np.float64).ravel() for x in (p_a, p_b))
    codes = cluster_codes(clusters, y.size)
    n_clusters = int(codes.max()) + 1
    _, sums = _per_cluster(codes, n_clusters, {"one": np.ones_like(y), "diff": (a - y) ** 2 - (b - y) ** 2})
    auc_a, auc_b = _ClusteredAuc(y, a, codes), _ClusteredAuc(y, b, codes)
    reps: dict[str, list[float]] = {"roc_auc": [], "brier": []}
    for draws in cluster_draws(n_clusters, n_boot, seed):
        lin = draws @ sums
        reps["brier"].extend((lin[:, 1] / lin[:, 0]).tolist())
        reps["roc_auc"].extend(auc_a(d) - auc_b(d) for d in draws)
    return _percentiles(reps, level)


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
