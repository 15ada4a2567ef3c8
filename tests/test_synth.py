"""cxr-embed synth: deterministic, readable back, and the label is learnable from the pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cxr_embed.errors import ConfigError
from cxr_embed.imageio import read_image
from cxr_embed.readers import read_dataset
from cxr_embed.synth import generate, plan_cases, render_case


def test_cohort_plan() -> None:
    cases = plan_cases(101, seed=5)
    assert len(cases) == 101 and sum(c.label for c in cases) == 51
    patients: dict[int, list] = {}
    for c in cases:
        patients.setdefault(c.patient, []).append(c)
    assert any(len(v) >= 3 for v in patients.values())  # patients have follow-ups
    for visits in patients.values():
        assert [c.study for c in visits] == list(range(len(visits)))
        assert len({c.split for c in visits}) == 1  # split is patient-wise
    assert 0.1 < sum(c.split == "test" for c in cases) / len(cases) < 0.45
    assert all(sum(c.findings) in ((1, 2, 3) if c.label else (0,)) for c in cases)


def test_deterministic_per_seed() -> None:
    case = plan_cases(4, seed=1)[2]
    a, b = render_case(case, seed=1, size=96), render_case(case, seed=1, size=96)
    assert a.dtype == np.float32 and a.shape == (96, 96) and np.array_equal(a, b)
    assert not np.array_equal(a, render_case(case, seed=2, size=96))
    assert 0.0 <= a.min() and a.max() <= 1.0 and a.std() > 0.1


@pytest.mark.slow
def test_label_is_learnable_from_pixel_statistics(tmp_path: Path) -> None:
    """Acceptance: logistic regression on simple pixel statistics of 400 images, patient-grouped CV AUC >= 0.8."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    generate(tmp_path, 400, layout="chestxray14", seed=11, size=64)
    errors: list = []
    records = read_dataset(tmp_path, errors=errors)
    assert errors == [] and len(records) == 400
    imgs = np.stack([np.asarray(read_image(r.path), dtype=np.float32) for r in records])
    z = (imgs - imgs.mean((1, 2), keepdims=True)) / imgs.std((1, 2), keepdims=True)
    grid = z.reshape(len(z), 8, 8, 8, 8)  # mean and std of 8x8 tiles of the standardised image
    features = np.concatenate(
        [grid.mean((2, 4)).reshape(len(z), -1), grid.std((2, 4)).reshape(len(z), -1)], 1
    )
    y = np.array([r.label for r in records])
    groups = np.array([r.patient_id for r in records])
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    with threadpool_limits(1):  # a tiny fit: BLAS threads only add contention on shared CI cores
        p = cross_val_predict(model, features, y, groups=groups, cv=GroupKFold(5), method="predict_proba")[
            :, 1
        ]
    assert roc_auc_score(y, p) >= 0.8
    # ... and not trivially: global brightness alone is a poor predictor
    assert roc_auc_score(y, imgs.mean((1, 2))) < 0.7


def test_cli_synth_json_and_errors(tmp_path: Path) -> None:
    from cxr_embed_cli.main import app

    runner = CliRunner()
    result = runner.invoke(
        app, ["synth", str(tmp_path / "d"), "--n", "6", "--size", "64", "--seed", "4", "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n_images"] == 6 and summary["n_abnormal"] == 3 and summary["layout"] == "chestxray14"
    assert len(read_dataset(tmp_path / "d")) == 6
    assert read_image(next((tmp_path / "d").rglob("*.png"))).size == (64, 64)
    bad = runner.invoke(app, ["synth", str(tmp_path / "e"), "--n", "2", "--layout", "nifti"])
    assert bad.exit_code == 1 and "Unknown layout" in bad.output
    with pytest.raises(ConfigError, match="--size"):
        generate(tmp_path / "f", 2, size=8)
