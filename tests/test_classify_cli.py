"""``cxr-embed classify`` and ``predict`` end to end on synth images embedded by the tiny model."""

from __future__ import annotations

import json
import shutil

import pytest
from cxr_embed_cli.main import app
from typer.testing import CliRunner

from cxr_embed.store import Store

runner = CliRunner()


@pytest.fixture(scope="module")
def classified_store(tiny_store, tmp_path_factory):
    """A copy of ``tiny_store`` after one ``classify --json`` run (lr and svm, 3 folds, Platt)."""
    path = tmp_path_factory.mktemp("classify_cli") / "store"
    shutil.copytree(tiny_store.path, path)
    result = runner.invoke(app, ["classify", "--store", str(path), "--models", "lr,svm", "--folds", "3",
                                 "--calibration", "platt", "--bootstrap", "100", "--json"])
    assert result.exit_code == 0, result.output
    return path, json.loads(result.stdout)


def test_classify_json_and_results_in_the_store(classified_store) -> None:
    path, doc = classified_store
    assert doc["leakage"] == [0, 0, 0]
    assert [r["classifier"] for r in doc["summary"]] == ["lr", "svm"]
    assert all(0 <= r["roc_auc"] <= 1 and 0 <= r["brier"] <= 1 for r in doc["summary"])
    con = Store.open(path).connect()
    preds = con.execute("SELECT classifier, count(*), min(probability) >= 0, max(probability) <= 1 FROM predictions "
                        "WHERE run_id = ? GROUP BY 1 ORDER BY 1", [doc["run_id"]]).fetchall()
    assert preds == [("lr", 40, True, True), ("svm", 40, True, True)]
    kind, params = con.execute("SELECT kind, params FROM runs WHERE run_id = ?", [doc["run_id"]]).fetchone()
    assert kind == "classify" and json.loads(params)["models"] == ["lr", "svm"]
    assert con.execute("SELECT count(*) FROM metrics WHERE run_id = ? AND fold = -1 AND metric = 'ece'",
                       [doc["run_id"]]).fetchone() == (2,)
    assert sorted(p.name for p in (path / "classifiers").iterdir()) == ["lr.json", "lr.skops", "svm.json", "svm.skops"]


def test_classify_table_output_and_user_errors(classified_store) -> None:
    path, _ = classified_store
    result = runner.invoke(app, ["classify", "--store", str(path), "--models", "knn", "--folds", "3",
                                 "--bootstrap", "0", "--no-refit", "--no-plots"])
    assert result.exit_code == 0, result.output
    assert "knn" in result.stdout and "Subgroups" in result.stdout
    bad = runner.invoke(app, ["classify", "--store", str(path), "--models", "xgboost"])
    assert bad.exit_code == 1 and "Unknown classifier" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(app, ["classify", "--store", str(path), "--calibration", "magic"])
    assert bad.exit_code == 1 and "calibration" in bad.output


def test_predict_scores_new_images_with_the_store_model(classified_store, synth_cxr14, tiny_model, tmp_path) -> None:
    from cxr_embed.evaluation import predict_images

    path, _ = classified_store
    images = sorted(synth_cxr14.glob("images_*/images/*.png"))[:1]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    results, meta = predict_images(Store.open(path), "lr", [*images, broken], model=tiny_model)
    assert set(meta["thresholds"]) == {"youden", "sens90"} and meta["model_id"] == tiny_model.model_id
    for r in results[:1]:
        assert 0 <= r.probability <= 1 and r.error is None
        assert r.decisions["sens90"] == (r.probability >= meta["thresholds"]["sens90"])
    assert results[1].probability is None and "broken.png" in results[1].error


def test_predict_cli_reports_a_missing_classifier(classified_store, synth_cxr14) -> None:
    path, _ = classified_store
    image = sorted(synth_cxr14.glob("images_*/images/*.png"))[0]
    missing = runner.invoke(app, ["predict", "--store", str(path), "--classifier", "rf", str(image)])
    assert missing.exit_code == 1 and "No classifier 'rf'" in missing.output and "lr" in missing.output
