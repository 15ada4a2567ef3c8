"""The three places the service meets work of other issues; each is one small function to switch.

* :func:`load_model` — today ``MedImageInsight.load`` of an explicit (or default) model folder,
  refused unless it is the store's model. Switch to ``load_store_model(store, model_dir, device=,
  precision=)`` when the store remembers its model.
* :func:`load_classifier` — today ``evaluation.load_model`` (skops with a type allow-list), with the
  file's sha256 computed here. Switch to ``classifier_files.load_classifier(store_path, name)`` when
  classifier files carry run id / plan / checksum metadata and cannot run code.
* DICOM decoding and the chest-only check live in :mod:`cxr_embed.serve.scope` (``id_key`` and
  ``_decode_dicom``): switch them to the DICOM de-identification issue's reader and scope rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cxr_embed.errors import ConfigError

if TYPE_CHECKING:
    from cxr_embed.model import MedImageInsight
    from cxr_embed.store import Store

FINETUNED = "finetuned"


@dataclass(frozen=True)
class ServedClassifier:
    """What triage needs of a saved classifier, and what it reports about it."""

    name: str
    target: str
    run_id: str | None
    plan: str | None
    sha256: str
    thresholds: dict[str, float]
    model_id: str
    checkpoint_sha256: str
    predict_proba: Callable[[np.ndarray], np.ndarray]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "target": self.target,
            "run_id": self.run_id,
            "plan": self.plan,
            "sha256": self.sha256,
            "model_id": self.model_id,
            "checkpoint_sha256": self.checkpoint_sha256,
            "thresholds": self.thresholds,
        }


def load_model(store: Store, model_dir: str | Path | None, *, device: str, precision: str) -> MedImageInsight:
    """The store's model on ``device``; StoreMismatchError when the folder holds another checkpoint."""
    from cxr_embed.model import MedImageInsight

    model = MedImageInsight.load(model_dir, device=device, precision=precision)
    store.check_compatible(model.model_id, model.checkpoint_sha256, model.preprocessor.fingerprint())
    return model


def load_classifier(store: Store, name: str) -> ServedClassifier:
    """A saved classifier of ``store`` (``<store>/classifiers/<name>.skops``), checked against its model."""
    if name == FINETUNED:
        raise ConfigError(
            "--classifier finetuned needs the fine-tuned head saved as a classifier file, which this "
            "build cannot load yet; serve a classifier saved by `cxr-embed classify` (e.g. logreg)."
        )
    from cxr_embed.evaluation import load_model as load_saved
    from cxr_embed.model.files import sha256_file

    fitted, meta = load_saved(store, name)
    store.check_compatible(meta["model_id"], meta["checkpoint_sha256"], meta["preprocess_fingerprint"])
    return ServedClassifier(
        name=meta["name"],
        target=meta.get("target", "abnormal"),
        run_id=meta.get("run_id"),
        plan=meta.get("plan"),
        sha256=sha256_file(Path(store.path) / "classifiers" / f"{name}.skops"),
        thresholds={k: float(v) for k, v in meta["thresholds"].items()},
        model_id=meta["model_id"],
        checkpoint_sha256=meta["checkpoint_sha256"],
        predict_proba=fitted.predict_proba,
    )


def saved_classifiers(store: Store) -> list[str]:
    """Names of the classifiers saved in the store (for ``GET /v1/store``)."""
    folder = Path(store.path) / "classifiers"
    return sorted(p.stem for p in folder.glob("*.skops")) if folder.is_dir() else []
