"""Folds, the leakage check, calibration and the full store run (``classify_store``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxr_embed import evaluation as E
from cxr_embed import metrics
from cxr_embed import plans as P
from cxr_embed.calibration import fit_calibrator
from cxr_embed.cohort import synthetic_cohort
from cxr_embed.crossval import cross_validate
from cxr_embed.errors import ConfigError, EvaluationError
from cxr_embed.predict import load_model


def _cohort(n: int = 400, seed: int = 0):
    c = synthetic_cohort(n, 16, separation=2.0, n_clusters=4, seed=seed)
    return c, P.group_ids(c.patients)


def test_folds_are_patient_disjoint_stratified_and_cover_every_row() -> None:
    c, groups = _cohort()
    folds = P.patient_group_folds(c.labels, groups, k=5, seed=3)
    assert P.check_leakage(folds, groups) == [0] * 5
    test_rows = np.concatenate([f.test for f in folds])
    assert np.array_equal(np.sort(test_rows), np.arange(len(c.labels)))
    prevalence = c.labels.mean()
    assert all(abs(c.labels[f.test].mean() - prevalence) < 0.12 for f in folds)


def test_leaky_split_is_caught_with_per_fold_counts() -> None:
    c, groups = _cohort()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(groups))  # an image-level split: patients land on both sides
    folds = [P.Fold(i, np.setdiff1d(order, part), part) for i, part in enumerate(np.array_split(order, 5))]
    counts = P.shared_patients(folds, groups)
    assert all(c > 0 for c in counts)
    with pytest.raises(EvaluationError, match=r"Patient leakage.*fold 0: \d+"):
        P.check_leakage(folds, groups)
    with pytest.raises(EvaluationError, match="leakage"):
        cross_validate(c.embeddings, c.labels, groups, folds, ["lr"], n_boot=0)


def test_missing_patient_ids_are_their_own_groups() -> None:
    g = P.group_ids(["a", None, "a", "", None, float("nan")])
    assert g[0] == g[2] and len(set(g.tolist())) == 5


def test_official_split_and_its_errors() -> None:
    (fold,) = P.official_split(["train", "test", None, "train"])
    assert fold.train.tolist() == [0, 3] and fold.test.tolist() == [1]
    with pytest.raises(EvaluationError, match="--split official"):
        P.official_split(["train", None])
    with pytest.raises(EvaluationError, match="one class"):
        P.patient_group_folds([1, 1, 1, 1], [0, 1, 2, 3], k=2)


def test_holdout_slice_is_patient_disjoint_and_capped() -> None:
    c, groups = _cohort(1000)
    fit, held = P.holdout_slice(c.labels, groups, fraction=0.2, max_rows=100)
    assert not set(groups[fit]) & set(groups[held])
    assert 50 <= len(held) <= 160 and len(fit) + len(held) == 1000


@pytest.mark.parametrize("method", ["platt", "isotonic", "temperature"])
def test_calibrators_reduce_miscalibration(method: str) -> None:
    rng = np.random.default_rng(0)
    true_p = rng.uniform(0.02, 0.98, 4000)
    y = (rng.uniform(size=true_p.size) < true_p).astype(int)
    logit = np.log(true_p / (1 - true_p))
    overconfident = 1 / (1 + np.exp(-3 * logit))  # right ranking, wrong scale
    cal = fit_calibrator(method, overconfident[:2000], y[:2000])
    fixed = cal(overconfident[2000:])
    before = metrics.expected_calibration_error(y[2000:], overconfident[2000:])
    after = metrics.expected_calibration_error(y[2000:], fixed)
    assert after < before / 2
    if method != "isotonic":  # monotone maps keep the ranking exactly
        assert metrics.roc_auc(y[2000:], fixed) == pytest.approx(metrics.roc_auc(y[2000:], overconfident[2000:]))
    assert fit_calibrator("none", overconfident, y) is None
    with pytest.raises(ConfigError):
        fit_calibrator("bogus", overconfident, y)


def test_every_classifier_beats_0_9_auc_and_the_prior_brier(signal_run) -> None:
    _, run = signal_run
    assert run.leakage == [0, 0, 0]
    assert {r.classifier for r in run.results} == {"svm", "lr", "knn", "rf", "mlp"}
    for r in run.results:
        prior = r.labels.mean() * (1 - r.labels.mean())
        assert r.pooled.values["roc_auc"] > 0.9, r.classifier
        assert r.pooled.values["brier"] < prior, r.classifier
        low, high = r.pooled.auc_ci
        assert low < r.pooled.values["roc_auc"] < high
        assert r.pooled.values["sensitivity@sens90"] > 0.8  # thresholds chosen on training-side rows


def test_results_tables_written_and_queryable(signal_run) -> None:
    store, run = signal_run
    con = store.connect()
    n_rows = con.execute(
        "SELECT count(*), count(DISTINCT row_id) FROM predictions WHERE run_id = ? AND classifier = 'lr'", [run.run_id]
    ).fetchone()
    assert n_rows == (600, 600)
    pooled = con.execute(
        "SELECT value, ci_low, ci_high FROM metrics WHERE run_id = ? AND classifier = 'svm' AND fold = -1 AND metric = 'roc_auc'",
        [run.run_id],
    ).fetchone()
    assert pooled[0] > 0.9 and pooled[1] < pooled[0] < pooled[2]
    folds = con.execute("SELECT DISTINCT fold FROM metrics WHERE run_id = ? ORDER BY 1", [run.run_id]).fetchall()
    assert [f[0] for f in folds] == [-1, 0, 1, 2]
    params, timings = con.execute("SELECT params, timings FROM runs WHERE run_id = ?", [run.run_id]).fetchone()
    assert json.loads(params)["calibration"] == "platt" and json.loads(timings)["total"] > 0
    sub = con.execute("SELECT count(*) FROM metrics WHERE run_id = ? AND subgroup = 'sex' AND level = 'F' AND metric = 'roc_auc'", [run.run_id]).fetchone()
    assert sub[0] > 0


def test_subgroup_table_plots_and_saved_models(signal_run, signal_arrays) -> None:
    store, run = signal_run
    attrs = {(s["attribute"], s["group"]) for s in run.subgroups}
    assert {("sex", "M"), ("sex", "F"), ("view", "PA"), ("view", "AP")} <= attrs
    assert any(a == "age_band" for a, _ in attrs)
    assert sum(s["n"] for s in run.subgroups if s["attribute"] == "sex" and s["classifier"] == "lr") == 600
    assert sorted(p.rsplit("/", 1)[1] for p in run.plots) == ["pr_abnormal.png", "reliability_abnormal.png", "roc_abnormal.png"]
    for p in run.plots:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    emb, rows = signal_arrays
    y = np.array([r["label"] for r in rows])
    for name in ("svm", "lr", "knn", "rf", "mlp"):
        fitted, meta = load_model(store, name)
        assert meta["target"] == "abnormal" and meta["calibration"] == "platt"
        assert set(fitted.thresholds) == {"youden", "sens90"}
        prob = fitted.predict_proba(emb)
        assert metrics.roc_auc(y, prob) > 0.9  # refit on all rows: in-sample, so at least CV quality


def test_all_findings_skips_targets_without_positives(signal_store) -> None:
    run = E.classify_store(signal_store, E.ClassifyConfig(models=("lr",), folds=3, label="all-findings", n_boot=0, refit=False, plots=False))
    assert [r.target for r in run.results] == ["atelectasis", "cardiomegaly", "effusion", "infiltration"]
    assert set(run.skipped) == {"mass", "nodule", "pneumonia", "pneumothorax", "consolidation", "edema",
                                "emphysema", "fibrosis", "pleural_thickening", "hernia"}
    assert all(r.pooled.values["roc_auc"] > 0.6 for r in run.results)


def test_official_split_run_and_bad_options(signal_store) -> None:
    run = E.classify_store(signal_store, E.ClassifyConfig(models=("knn",), split="official", n_boot=0, refit=False, plots=False))
    (r,) = run.results
    assert set(np.unique(r.fold)) == {0} and len(r.rows) < 600
    with pytest.raises(ConfigError, match="Unknown --label"):
        E.classify_store(signal_store, E.ClassifyConfig(label="tumour"))
    with pytest.raises(ConfigError, match="Unknown classifier"):
        E.classify_store(signal_store, E.ClassifyConfig(models=("xgb",)))
