"""Where the service meets the rest of the library: the store's model and its saved classifiers.

Both are loaded once at start-up by :class:`cxr_embed.serve.engine.Engine`, with the same loaders
``predict`` uses, so a served decision is exactly the one ``cxr-embed predict`` makes from the same
file: :func:`cxr_embed.store.load_store_model` (the checkpoint the store was built with, checked by
sha256) and :func:`cxr_embed.predict.load_model` (JSON + safetensors, no code, calibrator and
operating points included).
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
    run_id: str
    plan_id: str | None
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
            "plan_id": self.plan_id,
            "sha256": self.sha256,
            "model_id": self.model_id,
            "checkpoint_sha256": self.checkpoint_sha256,
            "thresholds": self.thresholds,
        }


def load_model(store: Store, model_dir: str | Path | None, *, device: str, precision: str) -> MedImageInsight:
    """The store's model on ``device`` (its recorded folder unless ``model_dir``); refused if another checkpoint."""
    from cxr_embed.store import load_store_model

    return load_store_model(store, model_dir, device=device, precision=precision)


def load_classifier(store: Store, name: str, run: str | None = None) -> ServedClassifier:
    """Saved classifier ``name`` of ``run`` (default: the latest run), checked against the store's model."""
    if name == FINETUNED:
        raise ConfigError(
            "--classifier finetuned needs the fine-tuned head saved as a classifier file, which "
            "`cxr-embed finetune` does not write yet; serve a classifier saved by `cxr-embed classify` "
            "(e.g. logreg; list them with GET /v1/store)."
        )
    from cxr_embed.predict import load_model as load_saved

    fitted, meta = load_saved(store, name, run)
    store.check_compatible(
        meta.get("model_id"), meta.get("checkpoint_sha256"), meta.get("preprocess_fingerprint")
    )
    return ServedClassifier(
        name=meta["name"],
        target=meta.get("target", "abnormal"),
        run_id=meta["run_id"],
        plan_id=meta.get("plan_id"),
        sha256=meta["safetensors_sha256"],
        thresholds={k: float(v) for k, v in fitted.thresholds.items()},
        model_id=meta["model_id"],
        checkpoint_sha256=meta["checkpoint_sha256"],
        predict_proba=fitted.predict_proba,
    )


def saved_classifiers(store: Store) -> list[dict]:
    """Every run's saved classifiers, oldest first, the latest marked (for ``GET /v1/store``)."""
    from cxr_embed.classifier_files import list_runs

    return [{"run_id": r.run_id, "names": list(r.names), "latest": r.latest} for r in list_runs(store.path)]
