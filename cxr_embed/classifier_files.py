"""Saved classifiers: arrays in safetensors, everything else in JSON, one folder per classify run.

Layout under the store::

    classifiers/<run_id>/<name>.safetensors   the classifier's arrays (+ an isotonic calibrator's table)
    classifiers/<run_id>/<name>.json          format, classifier kind, hyper-parameters and fitted
                                              numbers, calibrator, operating points, model identity,
                                              run id, plan id, sha256 of the .safetensors file
    classifiers/latest.json                   {"run_id": ...}: the run ``predict`` uses by default

Why this format: a pickle, joblib or skops file can run code when it is loaded (skops' type
allow-list let a crafted file call an ``exec`` wrapper), and a store is a folder that gets copied
between people. Loading here only ever parses JSON and safetensors (no code in either), checks the
safetensors bytes against the sha256 recorded in the JSON, checks every array's name, dtype and
shape against what the named classifier declares (:class:`cxr_embed.array_state.Persistent`), and
then builds one of the package's own classes from them. Anything else is refused with a
:class:`StoreError` that says what is wrong.

Why per run: models from different runs side by side (lr from one run, svm from another) cannot be
told apart; a run's folder is written whole (built aside, then swapped in) and only then does
``latest.json`` (written atomically) point at it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cxr_embed import classifiers as clf
from cxr_embed.array_state import Persistent
from cxr_embed.atomicio import replace_dir, write_json_atomic
from cxr_embed.errors import ConfigError, StoreError

FORMAT = "cxr-embed-classifier"
FORMAT_VERSION = 1
LATEST = "latest.json"
CALIBRATORS = ("none", "platt", "temperature", "isotonic")
MAX_JSON_BYTES = 1_000_000
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_CALIBRATION_ARRAYS = {"calibration.x", "calibration.y"}


@dataclass
class SavedClassifier:
    """A loaded classifier file: the rebuilt classifier and what ``predict`` applies after it.

    ``calibrator`` holds the keyword arguments of :class:`cxr_embed.evaluation.Calibrator`
    (``method``, ``a``, ``b``, ``isotonic``) or is None when the run used no calibration.
    """

    name: str
    run_id: str
    classifier: Persistent
    calibrator: dict[str, Any] | None
    thresholds: dict[str, float]
    meta: dict[str, Any]
    path: Path


@dataclass(frozen=True)
class RunClassifiers:
    """One run folder under ``classifiers/``."""

    run_id: str
    names: tuple[str, ...]
    latest: bool


def classifiers_dir(store_path: str | Path) -> Path:
    return Path(store_path) / "classifiers"


def model_identity(store: Any) -> dict[str, Any]:
    """The store's model identity, recorded in each file so ``predict`` refuses another model's embeddings."""
    return {
        "model_id": store.model_id,
        "checkpoint_sha256": store.checkpoint_sha256,
        "preprocess_fingerprint": store.preprocess_fingerprint,
        "dim": store.dim,
    }


def _check_name(value: str, what: str) -> str:
    """Run ids and classifier names become file names: letters, digits, ``.``, ``_``, ``-`` only."""
    if not isinstance(value, str) or not _SAFE_NAME.fullmatch(value):
        raise ConfigError(f"Invalid {what} {value!r}: use letters, digits, '.', '_' and '-' only.")
    return value


# ------------------------------------------------------------------------------------ saving


def _calibrator_state(calibrator: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """JSON fields and arrays of a fitted ``calibration.Calibrator`` (None = no calibration)."""
    if calibrator is None:
        return {"method": "none"}, {}
    if calibrator.method != "isotonic":
        return {"method": calibrator.method, "a": float(calibrator.a), "b": float(calibrator.b)}, {}
    iso = calibrator.isotonic
    fields = {
        "method": "isotonic",
        "x_min": float(iso.X_min_),
        "x_max": float(iso.X_max_),
        "increasing": bool(iso.increasing_),
    }
    arrays = {
        "calibration.x": np.asarray(iso.X_thresholds_, dtype=np.float64),
        "calibration.y": np.asarray(iso.y_thresholds_, dtype=np.float64),
    }
    return fields, arrays


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_run_classifiers(
    store_path: str | Path,
    run_id: str,
    fitted: Mapping[str, Any],
    meta: Mapping[str, Any],
    per_model: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Path]:
    """Write every classifier of one run to ``classifiers/<run_id>/`` and point ``latest.json`` at it.

    ``fitted`` maps a file name (``svm``, ``lr-effusion``) to an ``crossval.FittedModel``;
    ``meta`` is recorded in every JSON file (model identity, calibration, ``plan_id``, ...);
    ``per_model[name]`` adds fields of one file (target, CV metrics). Call once per run: the
    folder is built aside and swapped in whole. Returns the ``.safetensors`` paths.
    """
    from safetensors.numpy import save

    _check_name(run_id, "run id")
    folder = classifiers_dir(store_path) / run_id
    created = datetime.now(timezone.utc).isoformat()
    files: dict[str, tuple[bytes, dict[str, Any]]] = {}
    for name, model in fitted.items():
        _check_name(name, "classifier name")
        params, arrays = model.classifier.get_state()
        calibrator, cal_arrays = _calibrator_state(model.calibrator)
        data = save({**arrays, **cal_arrays}, metadata={"format": FORMAT})
        doc = {
            **meta,
            **(per_model or {}).get(name, {}),
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": name,
            "classifier": model.name,
            "run_id": run_id,
            "plan_id": meta.get("plan_id"),
            "params": params,
            "calibrator": calibrator,
            "thresholds": {k: float(v) for k, v in model.thresholds.items()},
            "heldout_rows": int(len(model.heldout_y)),
            "created_at": created,
            "safetensors_sha256": _sha256(data),
        }
        files[name] = (data, doc)

    def build(tmp: Path) -> None:
        for name, (data, doc) in files.items():
            (tmp / f"{name}.safetensors").write_bytes(data)  # fsynced by replace_dir before the swap
            (tmp / f"{name}.json").write_text(json.dumps(doc, indent=2) + "\n")

    replace_dir(folder, build)
    write_json_atomic({"run_id": run_id, "updated_at": created}, classifiers_dir(store_path) / LATEST)
    return [folder / f"{name}.safetensors" for name in files]


# ----------------------------------------------------------------------------------- loading


def _read_json(path: Path) -> Any:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise StoreError(f"{path} is larger than a classifier metadata file can be; refusing to read it.")
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise StoreError(
            f"{path} is not readable JSON ({exc}); rerun `cxr-embed classify` to rewrite it."
        ) from None


def latest_run(store_path: str | Path) -> str | None:
    """The run id ``latest.json`` points at, or None when no run has saved classifiers."""
    path = classifiers_dir(store_path) / LATEST
    if not path.exists():
        return None
    doc = _read_json(path)
    run = doc.get("run_id") if isinstance(doc, dict) else None
    if not isinstance(run, str) or not _SAFE_NAME.fullmatch(run):
        raise StoreError(f"{path} does not name a run; rerun `cxr-embed classify` (or pass --run RUN_ID).")
    return run


def list_runs(store_path: str | Path) -> list[RunClassifiers]:
    """Every run folder with saved classifiers, oldest first (run ids sort by time)."""
    root = classifiers_dir(store_path)
    if not root.is_dir():
        return []
    latest = latest_run(store_path)
    runs = []
    for folder in sorted(root.iterdir()):
        if (
            folder.is_dir()
            and _SAFE_NAME.fullmatch(folder.name)
            and not folder.name.endswith((".tmp", ".old"))
        ):
            names = tuple(sorted(p.stem for p in folder.glob("*.json")))
            runs.append(RunClassifiers(folder.name, names, folder.name == latest))
    return runs


def _resolve_run(store_path: str | Path, run: str | None) -> str:
    root = classifiers_dir(store_path)
    if run is not None:
        return _check_name(run, "run id")
    latest = latest_run(store_path)
    if latest is not None:
        return latest
    if root.is_dir() and any(root.glob("*.skops")):
        raise StoreError(
            f"The classifiers in {root} were saved by an older cxr-embed as skops files, which are no longer "
            "loaded (loading them can run code). Rerun `cxr-embed classify` to save them in the safe format."
        )
    raise StoreError(
        f"No saved classifiers in {root}; run `cxr-embed classify` first (it saves the refitted models)."
    )


def _missing(store_path: str | Path, name: str, run: str) -> StoreError:
    runs = list_runs(store_path)
    here = next((r.names for r in runs if r.run_id == run), None)
    if here is None:
        known = ", ".join(r.run_id for r in runs) or "none"
        return StoreError(f"No classifier run {run!r} in {classifiers_dir(store_path)}. Runs: {known}.")
    elsewhere = [r.run_id for r in runs if name in r.names]
    hint = (
        f" Runs that have it: {', '.join(elsewhere)} (pick one with --run)."
        if elsewhere
        else (" Run `cxr-embed classify` with it to save one.")
    )
    return StoreError(
        f"No classifier {name!r} in run {run}. Available there: {', '.join(here) or 'none'}.{hint}"
    )


def _field(doc: dict, key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise StoreError(
            f"{path}: field {key!r} is missing or has the wrong type; the file is damaged or was not "
            "written by cxr-embed. Rerun `cxr-embed classify`."
        )
    return value


def _check_doc(doc: Any, name: str, run: str, path: Path) -> type[Persistent]:
    """Validate the JSON before any array is read; return the class it names."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StoreError(f"{path} is not a cxr-embed classifier file; refused.")
    if doc.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"{path} has format version {doc.get('format_version')!r}; this cxr-embed reads "
            f"version {FORMAT_VERSION}. Upgrade cxr-embed or rerun `cxr-embed classify`."
        )
    if doc.get("name") != name or doc.get("run_id") != run:
        raise StoreError(
            f"{path} says it is {doc.get('name')!r} of run {doc.get('run_id')!r}; refused "
            "(files were moved or renamed outside cxr-embed)."
        )
    kind = doc.get("classifier")
    if kind not in clf.CLASSIFIER_NAMES:
        raise StoreError(
            f"{path} names classifier {kind!r}, which is not one of cxr-embed's "
            f"({', '.join(clf.CLASSIFIER_NAMES)}); refused."
        )
    thresholds = _field(doc, "thresholds", dict, path)
    if not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        for v in thresholds.values()
    ):
        raise StoreError(f"{path}: the operating points are not all finite numbers; refused.")
    _field(doc, "params", dict, path)
    calibrator = _field(doc, "calibrator", dict, path)
    if calibrator.get("method") not in CALIBRATORS:
        raise StoreError(
            f"{path} names calibrator {calibrator.get('method')!r}; known: {', '.join(CALIBRATORS)}."
        )
    _field(doc, "safetensors_sha256", str, path)
    return clf.classifier_class(kind)


def _calibrator(fields: dict[str, Any], arrays: dict[str, np.ndarray], path: Path) -> dict[str, Any] | None:
    """Keyword arguments of ``calibration.Calibrator`` from the JSON fields and calibration arrays."""
    method = fields["method"]
    expected = _CALIBRATION_ARRAYS if method == "isotonic" else set()
    if set(arrays) != expected:
        raise StoreError(
            f"{path}: calibration tensors {sorted(arrays)} do not fit calibrator {method!r}; refused."
        )
    if method == "none":
        return None
    numbers = ("x_min", "x_max") if method == "isotonic" else ("a", "b")
    if not all(isinstance(fields.get(k), int | float) and math.isfinite(fields[k]) for k in numbers):
        raise StoreError(f"{path}: calibrator {method!r} lacks finite {', '.join(numbers)}; refused.")
    if method != "isotonic":
        return {"method": method, "a": float(fields["a"]), "b": float(fields["b"])}
    x, y = arrays["calibration.x"], arrays["calibration.y"]
    if x.dtype != np.float64 or y.dtype != np.float64 or x.ndim != 1 or x.shape != y.shape or not len(x):
        raise StoreError(f"{path}: the isotonic calibration table is malformed; refused.")
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1)
    # the fitted attributes by name; __setstate__ rebuilds the interpolation from them
    iso.__setstate__(
        {
            **iso.__getstate__(),
            "X_thresholds_": x,
            "y_thresholds_": y,
            "X_min_": float(fields["x_min"]),
            "X_max_": float(fields["x_max"]),
            "increasing_": bool(fields.get("increasing", True)),
        }
    )
    return {"method": "isotonic", "isotonic": iso}


def _read_arrays(path: Path, expected_sha256: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StoreError(f"Cannot read {path}: {exc}.") from None
    if _sha256(data) != expected_sha256:
        raise StoreError(
            f"Classifier file {path} does not match its recorded checksum: the store was modified outside "
            "cxr-embed (or the file is damaged). It is not loaded; rerun `cxr-embed classify` to rewrite it."
        )
    try:
        return load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError (and others on odd headers)
        raise StoreError(f"{path} is not a valid safetensors file ({exc}); refused.") from None


def load_classifier(store_path: str | Path, name: str, run: str | None = None) -> SavedClassifier:
    """Load classifier ``name`` of ``run`` (default: the latest run), refusing anything not written by cxr-embed.

    Only JSON and safetensors are parsed; no pickle, joblib or skops is ever read.
    """
    _check_name(name, "classifier name")
    run = _resolve_run(store_path, run)
    folder = classifiers_dir(store_path) / run
    json_path, st_path = folder / f"{name}.json", folder / f"{name}.safetensors"
    if not json_path.is_file() or not st_path.is_file():
        raise _missing(store_path, name, run)
    doc = _read_json(json_path)
    cls = _check_doc(doc, name, run, json_path)
    arrays = _read_arrays(st_path, doc["safetensors_sha256"])
    cal_arrays = {k: arrays.pop(k) for k in list(arrays) if k in _CALIBRATION_ARRAYS}
    calibrator = _calibrator(doc["calibrator"], cal_arrays, json_path)
    try:
        classifier = cls.from_state(doc["params"], arrays)
    except (ValueError, TypeError, KeyError) as exc:
        raise StoreError(
            f"{st_path} does not hold a valid {doc['classifier']} classifier ({exc}); refused."
        ) from None
    return SavedClassifier(name, run, classifier, calibrator, dict(doc["thresholds"]), doc, st_path)
