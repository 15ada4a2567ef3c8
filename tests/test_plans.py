"""Evaluation plans stored in the store, --where/--sample subsets, plan ids on every result row, the
latest_* views, and calibration warnings that cannot be missed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxr_embed import plans as P
from cxr_embed.calibration import fit_calibrator
from cxr_embed.errors import ConfigError, EvaluationError
from cxr_embed.evaluation import ClassifyConfig, classify_store

FAST = dict(models=("lr", "knn"), n_boot=0, refit=False, plots=False)


def _patients(store, plan):
    meta = store.metadata(columns=["row_id", "patient_id"]).to_pydict()
    by_row = dict(zip(meta["row_id"], meta["patient_id"], strict=True))
    return np.array([by_row[r] for r in plan.row_id], dtype=object)


def test_kfold_plan_is_patient_grouped_stored_once_and_reused(signal_store):
    settings = P.PlanSettings(kind="kfold", folds=4, seed=1)
    plan = P.get_or_make_plan(signal_store, settings)
    again = P.get_or_make_plan(signal_store, settings)
    assert plan.plan_id == again.plan_id and P.plan_ids(signal_store) == [plan.plan_id]
    assert signal_store.read_results("splits").num_rows == len(plan) == 600
    pats = _patients(signal_store, plan)
    for k in range(4):
        assert not set(pats[plan.fold == k]) & set(pats[plan.fold != k])
    loaded = P.load_plan(signal_store, plan.plan_id)
    assert np.array_equal(loaded.fold, plan.fold) and loaded.settings == settings
    assert (
        P.get_or_make_plan(signal_store, P.PlanSettings(kind="kfold", folds=4, seed=2)).plan_id
        != plan.plan_id
    )
    with pytest.raises(EvaluationError, match="No plan 'nope'.*known plans"):
        P.load_plan(signal_store, "nope")


def test_holdout_plan_where_and_sample(signal_store):
    plan = P.make_plan(
        signal_store, P.PlanSettings(kind="holdout", test_fraction=0.25, where="sex = 'F'", sample=200)
    )
    sexes = dict(zip(*signal_store.metadata(columns=["row_id", "sex"]).to_pydict().values(), strict=True))
    assert {sexes[r] for r in plan.row_id} == {"F"}
    assert 150 <= len(plan) <= 260
    pats = _patients(signal_store, plan)
    parts = {s: set(pats[plan.split == s]) for s in ("train", "val", "test")}
    assert (
        not parts["train"] & parts["test"]
        and not parts["val"] & parts["test"]
        and not parts["train"] & parts["val"]
    )
    all_f = np.array([sexes[r] for r in sexes.keys()]) == "F"
    meta = signal_store.metadata(columns=["patient_id", "sex"]).to_pydict()
    n_images = {p: meta["patient_id"].count(p) for p in set(pats)}
    assert sum(n_images.values()) == len(plan) and all_f.sum() > len(plan)  # whole patients, a real subset
    assert 0.15 < (plan.split == "test").mean() < 0.35
    with pytest.raises(ConfigError, match="not a valid condition"):
        P.make_plan(signal_store, P.PlanSettings(where="no_such_column = 1"))


def test_every_row_carries_the_plan_and_latest_metrics_has_one_row_per_classifier(signal_store):
    runs = [classify_store(signal_store, ClassifyConfig(folds=3, **FAST)) for _ in range(3)]
    assert len({r.plan_id for r in runs}) == 1
    con = signal_store.connect()
    assert con.execute("SELECT count(*) FROM predictions WHERE plan_id IS NULL").fetchone()[0] == 0
    assert con.execute("SELECT count(DISTINCT run_id) FROM metrics").fetchone()[0] == 3
    rows = con.execute(
        "SELECT classifier, value, run_id FROM latest_metrics WHERE metric = 'roc_auc' AND fold = -1 "
        "AND subgroup IS NULL ORDER BY classifier"
    ).fetchall()
    assert [r[0] for r in rows] == ["knn", "lr"] and {r[2] for r in rows} == {runs[-1].run_id}
    n = con.execute("SELECT count(*) FROM latest_predictions WHERE classifier = 'lr'").fetchone()[0]
    assert n == 600
    sub = con.execute(
        "SELECT DISTINCT subgroup FROM latest_metrics WHERE subgroup IS NOT NULL ORDER BY 1"
    ).fetchall()
    assert [s[0] for s in sub] == ["age_band", "sex", "view"]
    params = json.loads(con.execute("SELECT params FROM runs LIMIT 1").fetchone()[0])
    assert params["bootstrap_unit"] == "patient" and params["plan_id"] == runs[0].plan_id


def test_temperature_at_its_bound_and_few_rows_warn():
    y = np.array([0] * 20 + [1] * 20)
    p = np.where(y == 1, 0.51, 0.49)  # perfectly separated: the optimiser wants T -> 0
    cal = fit_calibrator("temperature", p, y)
    assert any("bound" in w for w in cal.warnings) and any("fewer than 30" in w for w in cal.warnings)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p = np.clip(0.5 + 0.2 * (y - 0.5) + rng.normal(0, 0.2, 400), 0.01, 0.99)
    assert fit_calibrator("temperature", p, y).warnings == []


def test_calibration_warnings_are_stored_with_the_run_and_raw_probabilities_kept(signal_store):
    run = classify_store(signal_store, ClassifyConfig(sample=80, calibration="platt", folds=2, **FAST))
    assert run.warnings and "fewer than 30" in run.warnings[0]
    con = signal_store.connect()
    stored = json.loads(con.execute("SELECT warnings FROM runs WHERE run_id = ?", [run.run_id]).fetchone()[0])
    assert stored == run.warnings
    raw, cal = (
        con.execute(
            "SELECT probability_raw, probability FROM predictions WHERE run_id = ? AND classifier = 'lr'",
            [run.run_id],
        )
        .fetchnumpy()
        .values()
    )
    assert len(raw) == len(cal) and not np.allclose(raw, cal)
