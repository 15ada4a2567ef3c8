"""``cxr-embed classify`` and ``predict`` end to end on synth images embedded by the tiny model."""

from __future__ import annotations

import csv
import io
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
    run_dir = path / "classifiers" / doc["run_id"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["lr.json", "lr.safetensors", "svm.json", "svm.safetensors"]
    assert json.loads((path / "classifiers" / "latest.json").read_text())["run_id"] == doc["run_id"]
    assert doc["saved_models"] == [str(run_dir / "lr.safetensors"), str(run_dir / "svm.safetensors")]


def test_classify_table_output_and_user_errors(classified_store) -> None:
    path, _ = classified_store
    result = runner.invoke(app, ["classify", "--store", str(path), "--models", "knn", "--folds", "3",
                                 "--bootstrap", "0", "--no-refit", "--no-plots", "--format", "table"],
                           env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "knn" in result.stdout and "Subgroups" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    bad = runner.invoke(app, ["classify", "--store", str(path), "--models", "xgboost"])
    assert bad.exit_code == 1 and "Unknown classifier" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(app, ["classify", "--store", str(path), "--calibration", "magic"])
    assert bad.exit_code == 1 and "calibration" in bad.output


def test_predict_scores_new_images_with_the_store_model(classified_store, synth_cxr14, tiny_model, tmp_path) -> None:
    from cxr_embed.predict import predict_images

    path, doc = classified_store
    images = sorted(synth_cxr14.glob("images_*/images/*.png"))[:2]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    run = predict_images(Store.open(path), "lr", [images[0], broken, *images[1:]], model=tiny_model, batch_size=2)
    assert (run.run_id, run.calibration, run.target, run.plan_id) == (doc["run_id"], "platt", "abnormal", doc["plan_id"])
    assert set(run.thresholds) == {"youden", "sens90"} and run.model_id == tiny_model.model_id
    good = [r for r in run.predictions if r.error is None]
    assert [r.path for r in good] == [str(p) for p in images]  # the bad file in a batch does not sink the others
    for r in good:
        assert 0 <= r.probability <= 1
        assert r.decisions["sens90"] == (r.probability >= run.thresholds["sens90"])
    assert run.predictions[1].probability is None and "broken.png" in run.predictions[1].error


@pytest.mark.slow  # two more classify runs and a tiny-model load in the CLI
def test_predict_cli_says_which_run_and_picks_another(classified_store, synth_cxr14, tmp_path) -> None:
    from cxr_embed.model import tiny_model_dir

    source, first = classified_store
    path = tmp_path / "store"
    shutil.copytree(source, path)
    second = runner.invoke(app, ["classify", "--store", str(path), "--models", "knn", "--folds", "3",
                                 "--bootstrap", "0", "--no-plots", "--json"])
    assert second.exit_code == 0, second.output
    second_run = json.loads(second.stdout)["run_id"]
    image = str(sorted(synth_cxr14.glob("images_*/images/*.png"))[0])
    base = ["predict", "--store", str(path), "--model-dir", str(tiny_model_dir()), "--device", "cpu", image]
    latest = runner.invoke(app, [*base, "-c", "knn"])
    assert latest.exit_code == 0 and f"from run {second_run}" in latest.stderr and "calibration none" in latest.stderr
    missing = runner.invoke(app, [*base, "-c", "lr"])
    assert missing.exit_code == 1 and f"No classifier 'lr' in run {second_run}" in missing.stderr
    assert first["run_id"] in missing.stderr and "--run" in missing.stderr
    older = runner.invoke(app, [*base, "-c", "lr", "--run", first["run_id"], "--batch-size", "4", "--json"])
    assert older.exit_code == 0, older.output
    out = json.loads(older.stdout)
    assert (out["run_id"], out["calibration"], out["classifier"]) == (first["run_id"], "platt", "lr")
    assert out["precision"] == "fp32" and len(out["classifier_sha256"]) == 64
    assert 0 <= out["predictions"][0]["probability"] <= 1
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    partial = runner.invoke(app, [*base, str(broken), "-c", "knn", "--format", "csv"])
    assert partial.exit_code == 2, partial.output  # some images failed: results for the rest, failures listed
    rows = list(csv.DictReader(io.StringIO(partial.stdout)))
    assert [r["image"] for r in rows] == [image, str(broken)]
    assert rows[0]["error"] == "" and 0 <= float(rows[0]["probability"]) <= 1 and rows[0]["abnormal@youden"] in ("true", "false")
    assert rows[1]["error"] and rows[1]["probability"] == ""
    assert "1 of 2 image(s) could not be scored" in partial.stderr


def test_predict_cli_reports_a_missing_classifier(classified_store, synth_cxr14) -> None:
    path, doc = classified_store
    image = sorted(synth_cxr14.glob("images_*/images/*.png"))[0]
    missing = runner.invoke(app, ["predict", "--store", str(path), "--classifier", "rf", str(image)])
    assert missing.exit_code == 1 and "No classifier 'rf'" in missing.output and "lr" in missing.output
    bad = runner.invoke(app, ["predict", "--store", str(path), "-c", "lr", "--run", "../../x", str(image)])
    assert bad.exit_code == 1 and "Invalid run id" in bad.stderr
