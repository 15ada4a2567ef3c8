"""Zero-shot classification: prompt files, the ensemble score, calibration only on training rows."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_embed.errors import ConfigError
from cxr_embed.records import FINDINGS
from cxr_embed.zeroshot import (
    ZeroShotClassifier,
    default_prompts,
    embed_prompts,
    load_prompts,
    prompt_report,
    zeroshot_scores,
)


def test_default_prompts_follow_the_modality_anatomy_finding_pattern() -> None:
    abnormal = default_prompts("abnormal")
    assert len(abnormal.positive) == len(FINDINGS) + 1
    assert all(p.startswith("x-ray chest ") for p in abnormal.positive + abnormal.negative)
    assert "x-ray chest pleural thickening" in abnormal.positive
    with pytest.raises(ConfigError, match="No zero-shot prompts"):
        default_prompts("fracture")


def test_prompt_files_toml_and_json(tmp_path) -> None:
    toml = tmp_path / "p.toml"
    toml.write_text('[abnormal]\npositive = ["x-ray chest opacity"]\nnegative = ["x-ray chest clear"]\n')
    assert load_prompts(toml, "abnormal").positive == ("x-ray chest opacity",)
    js = tmp_path / "p.json"
    js.write_text('{"effusion": {"positive": ["fluid"], "negative": ["no fluid"]}}')
    assert load_prompts(js, "effusion").negative == ("no fluid",)
    assert load_prompts(js, "abnormal") == default_prompts("abnormal")  # not in the file: defaults
    js.write_text('{"abnormal": {"positive": [], "negative": ["x"]}}')
    with pytest.raises(ConfigError, match="positive"):
        load_prompts(js, "abnormal")
    js.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid"):
        load_prompts(js, "abnormal")


def test_score_is_positive_minus_negative_centroid_cosine() -> None:
    pos = np.array([[1.0, 0, 0], [0, 1.0, 0]], dtype=np.float32)
    neg = np.array([[0, 0, 1.0]], dtype=np.float32)
    X = np.array([[1.0, 0, 0], [0, 0, 1.0]])
    assert zeroshot_scores(X, pos, neg) == pytest.approx([1 / np.sqrt(2), -1.0])


def test_calibration_uses_only_the_rows_given_to_fit() -> None:
    rng = np.random.default_rng(0)
    direction = np.zeros(8)
    direction[0] = 1
    y = rng.integers(0, 2, 400)
    X = rng.normal(size=(400, 8)) + np.outer(y, direction) * 1.5
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    pos, neg = direction[None, :].astype(np.float32), -direction[None, :].astype(np.float32)
    train, test = np.arange(200), np.arange(200, 400)
    a = ZeroShotClassifier(pos, neg).fit(X[train], y[train])
    b = ZeroShotClassifier(pos, neg).fit(X[train], y[train])
    c = ZeroShotClassifier(pos, neg).fit(X[test], 1 - y[test])  # other rows: another calibration
    assert (a.a_, a.b_) == (b.a_, b.b_) and a.a_ > 0 and c.a_ < 0
    p = a.predict_proba(X[test])
    assert ((p > 0) & (p < 1)).all()
    report = prompt_report(
        X, y, default_prompts("abnormal").__class__("abnormal", ("d0",), ("-d0",)), pos, neg
    )
    assert report[-1].prompt == "(ensemble)" and report[-1].roc_auc > 0.8


def test_tiny_model_end_to_end(tiny_model) -> None:
    prompts = default_prompts("cardiomegaly")
    pos, neg = embed_prompts(tiny_model, prompts)
    assert pos.shape == (2, tiny_model.embed_dim) and np.allclose(np.linalg.norm(pos, axis=1), 1, atol=1e-5)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, tiny_model.embed_dim))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    y = np.arange(30) % 2
    clf = ZeroShotClassifier(pos, neg).fit(X, y)
    assert clf.predict_proba(X).shape == (30,)
    assert len(prompt_report(X, y, prompts, pos, neg)) == 3


def test_classify_zeroshot_calibrates_inside_training_folds_and_saves(tiny_store, tmp_path) -> None:
    import shutil

    from cxr_embed.classifier_files import load_classifier
    from cxr_embed.crossval import fit_model
    from cxr_embed.evaluation import ClassifyConfig, classify_store
    from cxr_embed.model.files import tiny_model_dir
    from cxr_embed.plans import group_ids, load_plan
    from cxr_embed.store import Store

    shutil.copytree(tiny_store.path, tmp_path / "store")
    store = Store.open(tmp_path / "store")
    config = ClassifyConfig(
        models=("zeroshot",), folds=3, n_boot=20, plots=False, device="cpu", model_dir=str(tiny_model_dir())
    )
    run = classify_store(store, config)
    (result,) = run.results
    assert result.classifier == "zeroshot" and 0 <= result.pooled.values["roc_auc"] <= 1
    report = run.prompt_reports["abnormal"]
    assert report[-1].prompt == "(ensemble)" and len(report) == len(default_prompts("abnormal").positive) + 1
    con = store.connect()
    prompt_rows = con.execute(
        "SELECT count(*) FROM metrics WHERE run_id = ? AND subgroup = 'prompt'", [run.run_id]
    ).fetchone()[0]
    assert prompt_rows == len(report)
    # each fold's raw probabilities come from a fit on that fold's training rows only
    plan = load_plan(store, run.plan_id)
    meta = store.metadata()
    pos = plan.positions(meta.column("row_id").to_numpy())
    X = store.embeddings()[pos]
    y = np.asarray(meta.column("label").to_pylist())[pos]
    groups = group_ids(np.asarray(meta.column("patient_id").to_pylist(), dtype=object)[pos])
    model = load_classifier(store.path, "zeroshot").classifier
    options = {"positive": model.positive, "negative": model.negative}
    fold = plan.folds()[1]
    fitted = fit_model(
        "zeroshot",
        X[fold.train],
        y[fold.train],
        groups[fold.train],
        "none",
        config.seed + fold.index,
        options=options,
    )
    in_fold = np.isin(result.rows, fold.test)
    expected = fitted.predict_raw(X[result.rows[in_fold]])  # rows: positions in the plan (all labelled)
    assert np.allclose(result.prob_raw[in_fold], expected)
    # the saved (refitted) classifier predicts without the model: prompt embeddings are its arrays
    assert model.predict_proba(X[:5]).shape == (5,)
