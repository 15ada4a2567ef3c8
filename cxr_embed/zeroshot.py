"""Zero-shot classification with MedImageInsight's text tower: prompts in, calibrated probabilities out.

Why an ensemble of prompts: single prompts are brittle (users of peer models report near-random
results from a poorly worded one); averaging the unit text embeddings of several phrasings per class
and re-normalising is the standard fix (CLIP's prompt ensembling). The default prompts follow the
MedImageInsight pattern ``<modality> <anatomy> <finding>``; a TOML or JSON file given with
``--prompts`` replaces them per target::

    [abnormal]
    positive = ["x-ray chest cardiomegaly", "x-ray chest pleural effusion"]
    negative = ["x-ray chest no finding", "x-ray chest normal"]

The raw score of an image is ``cos(image, positive centroid) - cos(image, negative centroid)``. It
ranks (ROC-AUC) without any training, but it is not a probability: :class:`ZeroShotClassifier`
fits Platt's sigmoid on the *training* rows of each fold, exactly like the other classifiers'
calibration, so its probabilities are evaluated on rows it never saw. State is arrays only (the
prompt embeddings and two floats), so it persists like the other classifiers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cxr_embed import metrics
from cxr_embed.array_state import Persistent
from cxr_embed.calibration import platt, sigmoid
from cxr_embed.errors import ConfigError
from cxr_embed.records import FINDINGS

if TYPE_CHECKING:
    from cxr_embed.model import MedImageInsight

MODALITY_ANATOMY = "x-ray chest"


def _words(finding: str) -> str:
    return finding.replace("_", " ")


@dataclass(frozen=True)
class PromptSet:
    """The phrasings of the positive and the negative class of one target."""

    target: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]


def default_prompts(target: str) -> PromptSet:
    """The built-in ensemble: ``abnormal`` = any of the 14 findings vs normal; a finding vs its absence."""
    normal = (
        f"{MODALITY_ANATOMY} no finding",
        f"{MODALITY_ANATOMY} normal",
        f"{MODALITY_ANATOMY} no acute cardiopulmonary abnormality",
    )
    if target in ("abnormal", "label"):
        positive = tuple(f"{MODALITY_ANATOMY} {_words(f)}" for f in FINDINGS) + (
            f"{MODALITY_ANATOMY} abnormal",
        )
        return PromptSet("abnormal", positive, normal)
    if target in FINDINGS:
        words = _words(target)
        return PromptSet(
            target,
            (f"{MODALITY_ANATOMY} {words}", f"{MODALITY_ANATOMY} with {words}"),
            (f"{MODALITY_ANATOMY} no {words}", *normal[:2]),
        )
    raise ConfigError(
        f"No zero-shot prompts for target {target!r}: use abnormal or one of {', '.join(FINDINGS)}."
    )


def load_prompts(path: str | Path, target: str) -> PromptSet:
    """The prompt set of ``target`` from a TOML or JSON file (see the module docstring)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"Cannot read the prompts file {path}: {exc.strerror or exc}.") from None
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(
            f"The prompts file {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}"
        ) from None
    key = "abnormal" if target == "label" else target
    entry = data.get(key) if isinstance(data, dict) else None
    if entry is None:
        return default_prompts(target)
    prompts = {
        side: entry.get(side) if isinstance(entry, dict) else None for side in ("positive", "negative")
    }
    for side, values in prompts.items():
        if (
            not isinstance(values, list)
            or not values
            or not all(isinstance(v, str) and v.strip() for v in values)
        ):
            raise ConfigError(f"{path}: [{key}] needs a non-empty list of strings `{side} = [...]`.")
    return PromptSet(key, tuple(prompts["positive"]), tuple(prompts["negative"]))


def embed_prompts(model: MedImageInsight, prompts: PromptSet) -> tuple[np.ndarray, np.ndarray]:
    """Unit text embeddings (float32) of the positive and the negative phrasings."""
    pos = model.encode_texts(list(prompts.positive)).float().cpu().numpy()
    neg = model.encode_texts(list(prompts.negative)).float().cpu().numpy()
    return pos, neg


def _centroid(vectors: np.ndarray) -> np.ndarray:
    c = vectors.astype(np.float64).mean(axis=0)
    return c / max(np.linalg.norm(c), 1e-12)


def zeroshot_scores(X: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """Cosine to the positive centroid minus cosine to the negative centroid (X rows are unit-norm)."""
    X = np.asarray(X, dtype=np.float64)
    return X @ _centroid(positive) - X @ _centroid(negative)


class ZeroShotClassifier(Persistent):
    """Text-prompt scores with Platt scaling fitted on the training rows of each fold.

    Built by :func:`cxr_embed.classifiers.make_classifier` with the prompt embeddings as options
    (``classify`` embeds the target's prompts once with the store's model); saved like the other
    classifiers, so ``predict -c zeroshot`` needs no model: the prompt embeddings are its arrays.
    """

    name = "zeroshot"
    PARAMS = ("seed", "a_", "b_")
    ARRAYS = {"positive": ("float32", ("p", "d")), "negative": ("float32", ("q", "d"))}

    def __init__(self, positive: np.ndarray | None = None, negative: np.ndarray | None = None, seed: int = 0):
        self.positive = None if positive is None else np.asarray(positive, dtype=np.float32)
        self.negative = None if negative is None else np.asarray(negative, dtype=np.float32)
        self.seed = seed

    def fit(self, X, y, X_val=None, y_val=None) -> ZeroShotClassifier:
        """Calibrate only: the scores need no training, the sigmoid does (training rows only)."""
        if self.positive is None or self.negative is None:
            raise ConfigError(
                "The zero-shot classifier needs prompt embeddings: run it through `cxr-embed classify "
                "--models zeroshot`, which embeds the prompts with the store's model."
            )
        self.a_, self.b_ = platt(zeroshot_scores(X, self.positive, self.negative), np.asarray(y))
        return self

    def decision_function(self, X) -> np.ndarray:
        return zeroshot_scores(X, self.positive, self.negative)

    def predict_proba(self, X) -> np.ndarray:
        return sigmoid(self.a_ * self.decision_function(X) + self.b_)

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"positive": self.positive, "negative": self.negative}

    def _set_arrays(self, arrays, dims) -> None:
        self.positive, self.negative = arrays["positive"], arrays["negative"]


def classifier_options(
    model: MedImageInsight, target: str, prompts_file: str | Path | None = None
) -> tuple[PromptSet, dict[str, np.ndarray]]:
    """The prompt set of ``target`` and the ``make_classifier`` options it gives (its embeddings)."""
    prompts = load_prompts(prompts_file, target) if prompts_file else default_prompts(target)
    positive, negative = embed_prompts(model, prompts)
    return prompts, {"positive": positive, "negative": negative}


@dataclass(frozen=True)
class PromptScore:
    """ROC-AUC of one positive prompt (against the negative centroid), or of the whole ensemble."""

    prompt: str
    roc_auc: float


def prompt_report(
    X: np.ndarray, y: np.ndarray, prompts: PromptSet, positive: np.ndarray, negative: np.ndarray
) -> list[PromptScore]:
    """How much the answer depends on the wording: each positive prompt alone, then the ensemble.

    No fitting is involved (AUC is invariant to the monotone calibration), so this is computed on
    every labelled row without leaking anything into the evaluation.
    """
    y = np.asarray(y)
    out = [
        PromptScore(text, metrics.roc_auc(y, zeroshot_scores(X, positive[i : i + 1], negative)))
        for i, text in enumerate(prompts.positive)
    ]
    out.append(PromptScore("(ensemble)", metrics.roc_auc(y, zeroshot_scores(X, positive, negative))))
    return out
