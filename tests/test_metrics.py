"""Metric functions against sklearn on random cases, plus the operating-point rules."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from cxr_embed import metrics as M
from cxr_embed.errors import EvaluationError


def _case(seed: int, n: int = 300, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.25, n), 0, 1)
    if ties:
        p = np.round(p, 1)
    return y, p


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_metrics_agree_with_sklearn(seed: int, ties: bool) -> None:
    y, p = _case(seed, ties=ties)
    assert M.roc_auc(y, p) == pytest.approx(skm.roc_auc_score(y, p), abs=1e-12)
    assert M.average_precision(y, p) == pytest.approx(skm.average_precision_score(y, p), abs=1e-12)
    assert M.brier(y, p) == pytest.approx(skm.brier_score_loss(y, p), abs=1e-12)
    pred = (p >= 0.5).astype(int)
    assert M.accuracy(y, p) == pytest.approx(skm.accuracy_score(y, pred))
    assert M.f1(y, p) == pytest.approx(skm.f1_score(y, pred))
    sens, spec = M.sensitivity_specificity(y, p, 0.5)
    assert sens == pytest.approx(skm.recall_score(y, pred))
    assert spec == pytest.approx(skm.recall_score(1 - y, 1 - pred))


def test_bootstrap_ci_brackets_auc_and_narrows_with_n() -> None:
    y, p = _case(1, n=200)
    auc, low, high = M.roc_auc_ci(y, p, n_boot=300, seed=0)
    assert low < auc < high
    y2, p2 = _case(1, n=5000)
    _, low2, high2 = M.roc_auc_ci(y2, p2, n_boot=300, seed=0)
    assert (high2 - low2) < (high - low) / 2


def test_operating_points() -> None:
    y, p = _case(3, n=2000)
    thr = M.threshold_for_sensitivity(y, p, 0.9)
    sens, _ = M.sensitivity_specificity(y, p, thr)
    assert sens >= 0.9
    # the next higher distinct score would fall below 90 % sensitivity: the threshold is the highest one
    higher = np.unique(p[p > thr]).min()
    assert M.sensitivity_specificity(y, p, higher)[0] < 0.9
    fpr, tpr, thresholds = skm.roc_curve(y, p)
    best = thresholds[np.argmax(tpr - fpr)]
    assert M.youden_threshold(y, p) == pytest.approx(best)


def test_calibration_metrics() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(size=20000)
    y = (rng.uniform(size=p.size) < p).astype(int)  # perfectly calibrated
    assert M.expected_calibration_error(y, p) < 0.02
    assert M.expected_calibration_error(y, p**3) > 0.1
    mean_p, frac, count = M.reliability_curve(y, p, n_bins=10)
    assert count.sum() == p.size and np.allclose(mean_p, frac, atol=0.03)


def test_evaluate_binary_takes_thresholds_from_training_side() -> None:
    y_tr, p_tr = _case(4, n=500)
    y_te, p_te = _case(5, n=500)
    res = M.evaluate_binary(y_te, p_te, y_tr, p_tr, n_boot=100)
    assert res.thresholds["youden"] == M.youden_threshold(y_tr, p_tr)
    assert res.values["threshold@sens90"] == M.threshold_for_sensitivity(y_tr, p_tr)
    low, high = res.auc_ci
    assert low < res.values["roc_auc"] < high
    assert "sensitivity@youden" not in M.evaluate_binary(y_te, p_te, n_boot=0).values
    rows = dict((r[0], r) for r in res.rows())
    assert rows["roc_auc"][2] == low and rows["brier"][2] is None


def test_single_class_and_bad_input() -> None:
    assert np.isnan(M.roc_auc([1, 1, 1], [0.2, 0.5, 0.9]))
    with pytest.raises(EvaluationError):
        M.roc_auc([0, 1], [0.5])
    with pytest.raises(EvaluationError):
        M.brier([0, 2], [0.5, 0.5])
