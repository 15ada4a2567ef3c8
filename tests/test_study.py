"""``cxr-embed study`` on frozen arms: same rows, patient-clustered CIs, paired DeLong, the study view,
figures, and refusal of comparisons across plans."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cxr_embed_cli.main import app
from typer.testing import CliRunner

from cxr_embed import metrics
from cxr_embed.errors import EvaluationError
from cxr_embed.evaluation import ClassifyConfig, classify_store
from cxr_embed.study import StudyConfig, run_study


@pytest.fixture
def two_plans(signal_store):
    kfold = classify_store(
        signal_store, ClassifyConfig(models=("lr", "knn"), folds=3, n_boot=0, refit=False, plots=False)
    )
    holdout = classify_store(
        signal_store, ClassifyConfig(models=("lr",), split="holdout", n_boot=0, refit=False, plots=False)
    )
    return signal_store, kfold, holdout


def test_study_scores_every_arm_on_the_same_rows_with_ci_and_paired_test(two_plans):
    store, kfold, _ = two_plans
    result = run_study(store, StudyConfig(plan_id=kfold.plan_id, n_boot=100))
    assert result.n_images == 600 and result.plan_id == kfold.plan_id
    assert {a.name for a in result.arms} == {"frozen/lr", "frozen/knn"}
    by_name = {a.name: a for a in result.arms}
    assert result.reference == max(by_name, key=lambda n: by_name[n].values["roc_auc"])
    for a in result.arms:
        for m in ("roc_auc", "brier", "ece", "accuracy", "sensitivity@sens90"):
            low, high = a.cis[m]
            assert low <= a.values[m] <= high, (a.name, m)
        # the operating points are each fold's own thresholds, so sens90 is not simply 0.9 on the test rows
        assert "specificity@youden" in a.values
    (cmp,) = result.comparisons
    other = next(a for a in result.arms if a.name != result.reference)
    assert cmp.auc_diff == pytest.approx(
        other.values["roc_auc"] - by_name[result.reference].values["roc_auc"]
    )
    assert cmp.auc_diff_ci[0] <= cmp.auc_diff <= cmp.auc_diff_ci[1] and 0 <= cmp.delong_p <= 1
    lr = by_name["frozen/lr"]
    assert lr.values["roc_auc"] == pytest.approx(metrics.roc_auc(*_labels_probs(store, kfold.run_id, "lr")))
    assert [p.rsplit("/", 1)[1] for p in result.figures] == [
        "study_roc_abnormal.png",
        "study_reliability_abnormal.png",
    ]
    second = run_study(store, StudyConfig(plan_id=kfold.plan_id, n_boot=50, plots=False))
    con = store.connect()
    ids = con.execute("SELECT DISTINCT study_id FROM study").fetchall()
    assert ids == [(second.study_id,)]
    row = con.execute("SELECT value, p_value, versus FROM study WHERE metric = 'roc_auc_diff'").fetchone()
    assert row[2] == second.reference and 0 <= row[1] <= 1


def _labels_probs(store, run_id, classifier):
    t = (
        store.connect()
        .execute(
            "SELECT label, probability FROM predictions WHERE run_id = ? AND classifier = ?",
            [run_id, classifier],
        )
        .fetchnumpy()
    )
    return np.asarray(t["label"]), np.asarray(t["probability"])


def test_a_comparison_across_plans_is_refused(two_plans):
    store, kfold, holdout = two_plans
    with pytest.raises(EvaluationError, match="evaluated on plan .* cannot be compared"):
        run_study(
            store, StudyConfig(plan_id=kfold.plan_id, finetune_run=holdout.run_id, n_boot=0, plots=False)
        )


def test_study_cli_json(two_plans):
    store, _, holdout = two_plans
    res = CliRunner().invoke(
        app,
        [
            "study",
            "--store",
            str(store.path),
            "--plan",
            holdout.plan_id,
            "--bootstrap",
            "50",
            "--no-plots",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["plan_id"] == holdout.plan_id and doc["n_images"] < 600 and doc["table"][0]["roc_auc_ci"]
    res = CliRunner().invoke(app, ["study", "--store", str(store.path), "--split", "holdout", "--no-plots",
                                   "--bootstrap", "20", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["plan_id"] == holdout.plan_id  # the options make the same plan
    res = CliRunner().invoke(app, ["study", "--store", str(store.path), "--split", "holdout", "--sample", "100"])
    assert res.exit_code == 1 and "No run was evaluated on the plan these options make" in res.stderr
    res = CliRunner().invoke(app, ["study", "--store", str(store.path), "--plan", "nope"])
    assert res.exit_code == 1 and "No plan 'nope'" in res.stderr
