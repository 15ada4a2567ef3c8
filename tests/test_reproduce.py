"""``cxr-embed reproduce``: the plan of --dry-run, and the whole protocol on the synthetic ChestX-ray14 layout
with the packaged tiny model (one fine-tuning cell, one epoch), then a rerun that skips every finished step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cxr_embed_cli.main import app
from typer.testing import CliRunner

from cxr_embed.model.files import tiny_model_dir

TINY_RUN = [
    "--sample",
    "40",
    "--lrs",
    "1e-3",
    "--weight-decays",
    "0.1",
    "--epochs",
    "1",
    "--batch-size",
    "16",
    "--bootstrap",
    "20",
    "--device",
    "cpu",
]


@pytest.mark.slow
def test_dry_run_prints_the_plan_and_an_estimate(synth_cxr14: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app,
        [
            "reproduce",
            str(synth_cxr14),
            "--out",
            str(tmp_path / "r"),
            "--model-dir",
            str(tiny_model_dir()),
            "--dry-run",
            "--json",
            *TINY_RUN,
        ],
    )
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert [line.split()[1] for line in doc["plan"]] == [
        "index",
        "svm_cv",
        "holdout",
        "sweep",
        "study",
        "search",
        "report",
    ]
    assert "40 images" in doc["plan"][0] and "0.888" in doc["plan"][3]
    assert doc["seconds_per_image"] > 0 and doc["estimate_seconds"]["sweep"] > 0
    assert "estimate" in doc["estimate"]
    assert not (tmp_path / "r").exists()  # a dry run writes nothing


def test_reproduce_refuses_a_folder_that_is_not_chestxray14(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["reproduce", str(tmp_path), "--out", str(tmp_path / "r"), "--dry-run"])
    assert res.exit_code == 1 and "Data_Entry_2017" in res.stderr


@pytest.mark.slow
def test_tiny_protocol_completes_writes_the_report_and_resumes(
    synth_cxr14: Path, tiny_store, tmp_path: Path
) -> None:
    import shutil

    out = tmp_path / "r"
    shutil.copytree(tiny_store.path, out / "store")  # the store of these images: reused (the index resumes)
    args = [
        "reproduce",
        str(synth_cxr14),
        "--out",
        str(out),
        "--model-dir",
        str(tiny_model_dir()),
        "--json",
        *TINY_RUN,
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, f"{res.stderr}\n{res.exception!r}"
    doc = json.loads(res.stdout)
    report = (out / "report.md").read_text()
    assert "| check | measured (95% CI) | published |" in report and "0.888" in report and "0.8277" in report
    checks = {row["check"] for row in doc["comparison"]}
    assert "1. SVM, 5-fold CV: ROC-AUC" in checks and "3. hold-out test rows, fine-tuned: Brier" in checks
    state = json.loads((out / "reproduce.json").read_text())
    assert list(state["steps"]) == ["index", "svm_cv", "holdout", "sweep", "study", "search_eval", "report"]
    assert state["steps"]["index"]["rows"] == 40 and state["steps"]["index"]["reused"]
    assert state["steps"]["sweep"]["selected"] == {"lr": 1e-3, "weight_decay": 0.1}
    assert any(p.suffix == ".png" for p in (out / "figures").iterdir())
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0
    assert json.loads(again.stdout)["skipped"] == [
        "index",
        "svm_cv",
        "holdout",
        "sweep",
        "study",
        "search_eval",
    ]
    other = CliRunner().invoke(
        app, [*args[: -len(TINY_RUN)], *TINY_RUN[:-2], "--seed", "3", "--device", "cpu"]
    )
    assert other.exit_code == 1 and "other settings" in other.stderr
