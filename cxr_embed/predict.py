"""``predict``: embed new images with the store's model and score them with a saved classifier.

What was used is part of the answer: every result names the classifier's run id, the evaluation
plan it was fitted under, its calibration and the sha256 of its file, so a probability can always
be traced back to the ``classify`` run (and its metrics) that produced the model. The model must be
the one the store, and so the classifier, was built with: anything else is refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr_embed import classifier_files
from cxr_embed import classifiers as clf
from cxr_embed.calibration import Calibrator
from cxr_embed.crossval import FittedModel


@dataclass
class ImagePrediction:
    """One image: calibrated probability and the calls at each operating point (or why it failed)."""

    path: str
    probability: float | None
    decisions: dict[str, bool]
    error: str | None = None


@dataclass
class PredictionRun:
    """A ``predict`` call: which saved classifier was applied, and its predictions."""

    classifier: str  # file name: svm, lr-effusion, ...
    target: str
    run_id: str  # the classify run that fitted it
    plan_id: str | None
    calibration: str
    thresholds: dict[str, float]
    classifier_sha256: str
    model_id: str
    precision: str  # the embeddings' precision (the classifier was fitted on the store's, usually fp32)
    predictions: list[ImagePrediction]


def load_model(store: Any, name: str, run: str | None = None) -> tuple[FittedModel, dict[str, Any]]:
    """Saved classifier ``name`` of ``run`` (default: the latest) as a :class:`FittedModel`, plus its JSON."""
    saved = classifier_files.load_classifier(store.path, name, run)
    calibrator = Calibrator(**saved.calibrator) if saved.calibrator is not None else None
    empty = np.empty(0)
    return FittedModel(
        saved.meta["classifier"], saved.classifier, calibrator, saved.thresholds, empty, empty
    ), saved.meta


def _embedded(model: Any, paths: Sequence[str | Path], batch_size: int) -> Iterator[tuple[str, np.ndarray | str]]:
    """(path, embedding or error) per image, in batches: decoded by :mod:`cxr_embed.decode` (the
    same uint8 path as ``index``, so a stored image scores exactly as it was embedded); a file that
    fails is that file's error, never the batch's."""
    import torch

    from cxr_embed.decode import decode_image
    from cxr_embed.records import ReadFailure

    for start in range(0, len(paths), batch_size):
        chunk = [str(p) for p in paths[start : start + batch_size]]
        items = [decode_image(p, model.preprocessor) for p in chunk]
        good = [i for i, item in enumerate(items) if not isinstance(item, ReadFailure)]
        embedded: dict[int, np.ndarray] = {}
        if good:
            with torch.inference_mode():
                pixels = torch.stack([items[i] for i in good]).to(model.device)
                out = model.encode_images(model.preprocessor.normalize(pixels)).float().numpy()
            embedded = dict(zip(good, out, strict=True))
        for i, path in enumerate(chunk):
            yield path, embedded[i] if i in embedded else items[i].reason


def predict_images(
    store: Any,
    classifier: str,
    paths: Sequence[str | Path],
    *,
    run: str | None = None,
    model: Any = None,
    model_dir: str | Path | None = None,
    device: str = "auto",
    precision: str = "fp32",
    batch_size: int = 8,
) -> PredictionRun:
    """Embed ``paths`` with the store's model and apply saved classifier ``classifier`` of ``run``.

    An unreadable image gets an ``error`` and the others are still scored. ``model`` (an already
    loaded ``MedImageInsight``) skips loading from ``model_dir``/``device``/``precision``.
    """
    fitted, meta = load_model(store, classifier, run)
    store.check_compatible(
        meta.get("model_id"), meta.get("checkpoint_sha256"), meta.get("preprocess_fingerprint")
    )
    if model is None:
        from cxr_embed.store import load_store_model

        model = load_store_model(store, model_dir, device=device, precision=precision)
    store.check_compatible(model.model_id, model.checkpoint_sha256, model.preprocessor.fingerprint())
    results = list(_embedded(model, paths, max(1, batch_size)))
    good = [i for i, (_, e) in enumerate(results) if not isinstance(e, str)]
    prob = np.empty(0)
    if good:
        X = np.stack([results[i][1] for i in good])
        with clf.compute_threads(*X.shape):
            prob = fitted.predict_proba(X)
    calls = fitted.decisions(prob)
    scored = dict(zip(good, range(len(good)), strict=True))
    out = []
    for i, (path, emb) in enumerate(results):
        if isinstance(emb, str):
            out.append(ImagePrediction(path, None, {}, emb))
        else:
            j = scored[i]
            out.append(ImagePrediction(path, float(prob[j]), {k: bool(v[j]) for k, v in calls.items()}))
    return PredictionRun(
        classifier=classifier,
        target=meta.get("target", "abnormal"),
        run_id=meta["run_id"],
        plan_id=meta.get("plan_id"),
        calibration=meta["calibrator"]["method"],
        thresholds=fitted.thresholds,
        classifier_sha256=meta["safetensors_sha256"],
        model_id=model.model_id,
        precision=model.precision,
        predictions=out,
    )
