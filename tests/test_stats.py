"""DeLong's paired test against an independent hand computation, and the patient-clustered bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import mannwhitneyu, norm

from cxr_embed import stats
from cxr_embed.cohort import synthetic_cohort
from cxr_embed.plans import group_ids

# 4 positives, 5 negatives, a tie between arms' scales and one tie inside arm A (0.6 vs 0.6)
Y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0])
A = np.array([0.9, 0.8, 0.6, 0.4, 0.6, 0.5, 0.3, 0.2, 0.1])
B = np.array([0.7, 0.9, 0.3, 0.6, 0.5, 0.8, 0.2, 0.4, 0.1])


def _psi(x: float, y: float) -> float:
    return 1.0 if x > y else 0.5 if x == y else 0.0


def _reference(y, a, b):
    """DeLong (1988) by its definition: structural components from the O(mn) kernel, sample covariances."""
    comps = []
    for s in (a, b):
        pos, neg = s[y == 1], s[y == 0]
        v10 = np.array([np.mean([_psi(x, z) for z in neg]) for x in pos])
        v01 = np.array([np.mean([_psi(x, z) for x in pos]) for z in neg])
        comps.append((v10, v01))
    m, n = int(y.sum()), int((1 - y).sum())
    s10 = np.cov(np.vstack([comps[0][0], comps[1][0]]))
    s01 = np.cov(np.vstack([comps[0][1], comps[1][1]]))
    s = s10 / m + s01 / n
    return comps, s


def test_delong_components_auc_is_the_mann_whitney_u():
    auc, v10, v01 = stats.delong_components(Y, A)
    u = mannwhitneyu(A[Y == 1], A[Y == 0]).statistic
    assert auc == pytest.approx(u / (4 * 5))
    assert auc == pytest.approx(17.5 / 20)  # by hand: 0.9,0.8 beat all 5; 0.6 beats 3 and ties 1; 0.4 beats 2
    assert v01.mean() == pytest.approx(auc)
    comps, _ = _reference(Y, A, B)
    ref_v10, ref_v01 = comps[0]
    np.testing.assert_allclose(v10, ref_v10)
    np.testing.assert_allclose(v01, ref_v01)


def test_delong_variance_covariance_and_p_value_match_the_definition():
    test = stats.delong_paired(Y, A, B)
    _, s = _reference(Y, A, B)
    assert test.var_a == pytest.approx(s[0, 0]) and test.var_b == pytest.approx(s[1, 1])
    assert test.cov == pytest.approx(s[0, 1])
    z = (test.auc_a - test.auc_b) / np.sqrt(s[0, 0] + s[1, 1] - 2 * s[0, 1])
    assert test.z == pytest.approx(z)
    assert test.p_value == pytest.approx(2 * norm.sf(abs(z)))
    assert test.auc_b == pytest.approx(mannwhitneyu(B[Y == 1], B[Y == 0]).statistic / 20)


def test_delong_identical_scores_and_large_n_speed():
    assert stats.delong_paired(Y, A, A).p_value == 1.0
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200_000)
    a, b = y + rng.normal(0, 1, y.size), y + rng.normal(0, 1.1, y.size)
    t = stats.delong_paired(y, a, b)  # O(n log n): a few hundred ms at 200k rows
    assert t.auc_a > t.auc_b and t.p_value < 1e-6


def test_patient_clustered_ci_is_wider_than_image_level_on_correlated_images():
    c = synthetic_cohort(1500, 8, separation=1.0, n_clusters=4, seed=3)
    groups = group_ids(c.patients)
    # a score that is mostly the patient's (correlated within patient), plus a little image noise
    rng = np.random.default_rng(1)
    patient_effect = rng.normal(0, 1, groups.max() + 1)[groups]
    p = 1 / (1 + np.exp(-(1.2 * c.labels + patient_effect + rng.normal(0, 0.3, len(groups)))))
    image = stats.bootstrap_cis(c.labels, p, n_boot=300, seed=0)
    patient = stats.bootstrap_cis(c.labels, p, clusters=groups, n_boot=300, seed=0)
    for m in ("roc_auc", "brier", "accuracy"):
        width_img = image[m][1] - image[m][0]
        width_pat = patient[m][1] - patient[m][0]
        assert width_pat > 1.2 * width_img, m


def test_bootstrap_cis_bracket_the_estimates_and_paired_diff_is_centered():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 600)
    a = np.clip(0.3 * y + rng.normal(0.35, 0.2, 600), 0, 1)
    b = np.clip(0.2 * y + rng.normal(0.4, 0.2, 600), 0, 1)
    groups = np.arange(600) // 3
    cis = stats.bootstrap_cis(y, a, clusters=groups, decisions={"x": a > 0.4}, n_boot=200)
    from cxr_embed import metrics

    assert cis["roc_auc"][0] < metrics.roc_auc(y, a) < cis["roc_auc"][1]
    assert cis["brier"][0] < metrics.brier(y, a) < cis["brier"][1]
    assert "sensitivity@x" in cis and "accuracy" in cis
    diff = stats.paired_diff_cis(y, a, b, clusters=groups, n_boot=200)
    true_diff = metrics.roc_auc(y, a) - metrics.roc_auc(y, b)
    assert diff["roc_auc"][0] < true_diff < diff["roc_auc"][1]
