"""Classifier files: safetensors + JSON per run, exact reload, and refusal of anything not written by cxr-embed.

The canary tests put payloads in place of a saved classifier that would create a file if anything
executed them (pickle, a skops-style zip, a zip holding a pickle, JSON naming other classes, a
safetensors file with extra tensors): every one must be refused with a clear error and the canary
must not exist afterwards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from cxr_embed_cli.main import app
from safetensors.numpy import load, save
from typer.testing import CliRunner

from cxr_embed import classifier_files as F
from cxr_embed import classifiers as C
from cxr_embed import metrics
from cxr_embed.calibration import Calibrator, fit_calibrator
from cxr_embed.cohort import synthetic_cohort
from cxr_embed.crossval import FittedModel, fit_model
from cxr_embed.errors import ConfigError, StoreError
from cxr_embed.plans import group_ids

runner = CliRunner()

#: classifier -> calibration it is fitted with, so every calibrator kind is saved and reloaded too
CALIBRATED = {"svm": "none", "lr": "platt", "knn": "isotonic", "rf": "temperature", "mlp": "isotonic"}


@pytest.fixture(scope="module")
def cohort():
    c = synthetic_cohort(360, 16, separation=2.5, n_clusters=4, seed=3)
    return c.embeddings, c.labels.astype(int), group_ids(list(c.patients))


@pytest.fixture(scope="module")
def fitted(cohort):
    X, y, groups = cohort
    out = {
        name: fit_model(name, X[:300], y[:300], groups[:300], calibration, seed=0)
        for name, calibration in CALIBRATED.items()
        if name != "mlp"
    }
    # the MLP with 2 epochs (its default 20 cost seconds here); calibrated and thresholded the same way
    mlp = C.MlpClassifier(epochs=2).fit(X[:250], y[:250])
    raw = mlp.predict_proba(X[250:300])
    cal = fit_calibrator(CALIBRATED["mlp"], raw, y[250:300])
    out["mlp"] = FittedModel(
        "mlp", mlp, cal, metrics.operating_points(y[250:300], cal(raw)), y[250:300], cal(raw)
    )
    return out


def saved_prob(saved: F.SavedClassifier, X: np.ndarray) -> np.ndarray:
    """What ``predict`` computes from a loaded file (classifier, then its calibrator)."""
    model = FittedModel(
        saved.meta["classifier"],
        saved.classifier,
        Calibrator(**saved.calibrator) if saved.calibrator else None,
        saved.thresholds,
        np.empty(0),
        np.empty(0),
    )
    return model.predict_proba(X)


def test_every_classifier_reloads_to_the_same_predictions(tmp_path, fitted, cohort) -> None:
    X = cohort[0][300:]
    paths = F.save_run_classifiers(
        tmp_path,
        "classify-run1",
        fitted,
        {"calibration": "mixed", "plan_id": "plan-a"},
        {"lr": {"target": "abnormal"}},
    )
    assert sorted(p.name for p in (tmp_path / "classifiers" / "classify-run1").iterdir()) == sorted(
        f"{n}.{ext}" for n in CALIBRATED for ext in ("json", "safetensors")
    )
    assert (
        len(paths) == 5
        and json.loads((tmp_path / "classifiers" / "latest.json").read_text())["run_id"] == "classify-run1"
    )
    for name, model in fitted.items():
        saved = F.load_classifier(tmp_path, name)
        assert saved.run_id == "classify-run1" and saved.meta["plan_id"] == "plan-a"
        assert saved.meta["calibrator"]["method"] == CALIBRATED[name] and saved.thresholds == model.thresholds
        expected = model.predict_proba(X)
        assert np.array_equal(saved_prob(saved, X), expected), name
        sha = hashlib.sha256(
            (tmp_path / "classifiers" / "classify-run1" / f"{name}.safetensors").read_bytes()
        ).hexdigest()
        assert saved.meta["safetensors_sha256"] == sha
    assert F.load_classifier(tmp_path, "lr").meta["target"] == "abnormal"


def test_runs_are_kept_apart_and_latest_moves(tmp_path, fitted) -> None:
    F.save_run_classifiers(tmp_path, "classify-a", {"lr": fitted["lr"], "svm": fitted["svm"]}, {})
    F.save_run_classifiers(tmp_path, "classify-b", {"knn": fitted["knn"]}, {})
    assert [(r.run_id, r.names, r.latest) for r in F.list_runs(tmp_path)] == [
        ("classify-a", ("lr", "svm"), False),
        ("classify-b", ("knn",), True),
    ]
    assert F.load_classifier(tmp_path, "knn").run_id == "classify-b"
    with pytest.raises(
        StoreError, match=r"No classifier 'lr' in run classify-b.*classify-a \(pick one with --run\)"
    ):
        F.load_classifier(tmp_path, "lr")
    assert F.load_classifier(tmp_path, "lr", run="classify-a").run_id == "classify-a"
    with pytest.raises(StoreError, match="No classifier run 'classify-z'"):
        F.load_classifier(tmp_path, "lr", run="classify-z")
    with pytest.raises(ConfigError, match="Invalid run id"):
        F.load_classifier(tmp_path, "lr", run="../classify-a")
    with pytest.raises(StoreError, match="No saved classifiers"):
        F.load_classifier(tmp_path / "empty", "lr")


# ------------------------------------------------------------------------------ canary payloads


class _Payload:
    """Unpickling this runs ``os.system("touch <canary>")``."""

    def __init__(self, canary: Path):
        self.canary = canary

    def __reduce__(self):
        return os.system, (f"touch {self.canary}",)


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def _skops_like(canary: Path) -> bytes:
    """A skops-format zip whose schema asks for a function call that would create the canary."""
    schema = {
        "__class__": "system",
        "__module__": "os",
        "__loader__": "FunctionNode",
        "content": {"args": [f"touch {canary}"]},
        "protocol": 2,
        "_skops_version": "0.10",
    }
    return _zip({"schema.json": json.dumps(schema).encode()})


def _rewrite(folder: Path, stem: str, data: bytes | None = None, **changes) -> None:
    """Replace a saved file's bytes and/or JSON fields, re-recording the sha256 (as an attacker would)."""
    st, js = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    if data is not None:
        st.write_bytes(data)
    doc = json.loads(js.read_text())
    doc.update(changes)
    doc["safetensors_sha256"] = hashlib.sha256(st.read_bytes()).hexdigest()
    js.write_text(json.dumps(doc))


def _with_extra_tensor(path: Path) -> bytes:
    arrays = load(path.read_bytes())
    return save(
        {**arrays, "payload": np.frombuffer(b"import os; os.system('touch x')", dtype=np.uint8).copy()}
    )


ATTACKS = {
    "pickle": (lambda f, c: _rewrite(f, "lr", pickle.dumps(_Payload(c))), "not a valid safetensors file"),
    "skops zip": (lambda f, c: _rewrite(f, "lr", _skops_like(c)), "not a valid safetensors file"),
    "zip with a pickle": (
        lambda f, c: _rewrite(f, "lr", _zip({"archive/data.pkl": pickle.dumps(_Payload(c))})),
        "not a valid safetensors file",
    ),
    "pickle, checksum not updated": (
        lambda f, c: (f / "lr.safetensors").write_bytes(pickle.dumps(_Payload(c))),
        "does not match its recorded checksum",
    ),
    "json class path": (
        lambda f, c: _rewrite(f, "lr", classifier="os.system"),
        "names classifier 'os.system'",
    ),
    "json nested object": (
        lambda f, c: _rewrite(
            f,
            "lr",
            params={
                "C": {"__class__": "subprocess.Popen", "args": [f"touch {c}"]},
                "seed": 0,
                "tune_rows": 1,
                "C_": 1.0,
                "intercept_": 0.0,
            },
        ),
        "not plain numbers",
    ),
    "json calibrator": (
        lambda f, c: _rewrite(f, "lr", calibrator={"method": "builtins.exec", "a": f"open('{c}','w')"}),
        "names calibrator 'builtins.exec'",
    ),
    "json renamed": (lambda f, c: _rewrite(f, "lr", name="svm"), "says it is 'svm'"),
    "extra tensor": (
        lambda f, c: _rewrite(f, "lr", _with_extra_tensor(f / "lr.safetensors")),
        r"unexpected tensors \['payload'\]",
    ),
    "wrong shape": (
        lambda f, c: _rewrite(
            f, "lr", save({**load((f / "lr.safetensors").read_bytes()), "coef": np.zeros(3, np.float32)})
        ),
        "tensor coef has shape",
    ),
    "not json": (lambda f, c: (f / "lr.json").write_bytes(pickle.dumps(_Payload(c))), "not readable JSON"),
    "fitted number missing": (
        lambda f, c: _rewrite(
            f, "lr", params={"C": None, "seed": 0, "tune_rows": 1, "C_": 1.0, "intercept_": None}
        ),
        "not plain numbers",
    ),
    "empty": (lambda f, c: _rewrite(f, "lr", b""), "not a valid safetensors file"),
    "truncated": (
        lambda f, c: _rewrite(f, "lr", (f / "lr.safetensors").read_bytes()[:100]),
        "not a valid safetensors file",
    ),
    "json is a directory": (
        lambda f, c: ((f / "lr.json").unlink(), (f / "lr.json").mkdir()),
        "No classifier 'lr'",
    ),
    "latest is garbage": (
        lambda f, c: (f.parent / "latest.json").write_bytes(b"\x00\xff" * 10),
        "not readable JSON",
    ),
}


@pytest.fixture
def store_with_lr(tmp_path, synthetic_store, fitted) -> Path:
    path = tmp_path / "store"
    shutil.copytree(synthetic_store.path, path)
    F.save_run_classifiers(path, "classify-x", {"lr": fitted["lr"]}, F.model_identity(synthetic_store))
    return path


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_crafted_classifier_files_are_refused_and_never_run(attack, store_with_lr, tmp_path) -> None:
    canary = tmp_path / "canary"
    tamper, message = ATTACKS[attack]
    tamper(store_with_lr / "classifiers" / "classify-x", canary)
    with pytest.raises(StoreError, match=message):
        F.load_classifier(store_with_lr, "lr")
    result = runner.invoke(
        app, ["predict", "--store", str(store_with_lr), "-c", "lr", str(tmp_path / "x.png")]
    )
    assert result.exit_code == 1 and "Error:" in result.stderr and "Traceback" not in result.output, (
        result.output
    )
    assert not canary.exists()


def test_legacy_skops_store_and_bad_latest_pointer(store_with_lr, tmp_path) -> None:
    canary = tmp_path / "canary"
    folder = store_with_lr / "classifiers"
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "lr.skops").write_bytes(_skops_like(canary))
    with pytest.raises(StoreError, match="older cxr-embed as skops files"):
        F.load_classifier(store_with_lr, "lr")
    (folder / "latest.json").write_text(json.dumps({"run_id": "../../etc"}))
    with pytest.raises(StoreError, match="does not name a run"):
        F.load_classifier(store_with_lr, "lr")
    assert not canary.exists()
