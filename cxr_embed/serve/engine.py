"""The service's read side: the store (re-opened when it grows), the model, the classifier, the distance gate.

All model and search work runs on one executor thread (:attr:`Engine.executor`): batches from the
:class:`~cxr_embed.serve.batching.MicroBatcher` and the occasional text query take turns, so the
model never runs two forwards at once and the event loop never blocks.

Distance gate: a query whose most similar stored case is less similar than the store's own cases
are to theirs is outside what the store can vouch for. For a sample of stored rows the server
computes the similarity of each to its nearest stored case *of another patient* (what a new
patient's image faces), and abstains below the ``ood_percentile`` (default 1st) percentile of those.
The threshold, percentile and sample size are reported by ``GET /v1/store`` and with each answer.

Growth: ``store.json`` is stat-ed at most every ``reload_seconds``; when it changed the store is
re-opened (which proves FAISS ids = row ids) and swapped in. While an ``index`` run has appended
shards but not yet grown the index, the open fails and the previous store keeps answering.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cxr_embed import retrieval
from cxr_embed.errors import StoreError
from cxr_embed.serve import seams
from cxr_embed.serve.config import ServeConfig
from cxr_embed.store import MANIFEST, Store

if TYPE_CHECKING:
    import torch

    from cxr_embed.model import MedImageInsight

log = logging.getLogger("cxr_embed.serve")


@dataclass(frozen=True)
class DistanceGate:
    """Abstain when the nearest stored case is less similar than ``threshold``."""

    threshold: float
    percentile: float
    sample: int
    median: float

    def allows(self, nearest_similarity: float | None) -> bool:
        return nearest_similarity is not None and nearest_similarity >= self.threshold

    def describe(self) -> dict[str, float | int]:
        return {
            "threshold": self.threshold,
            "percentile": self.percentile,
            "sample": self.sample,
            "median_nearest_similarity": self.median,
        }


def distance_gate(store: Store, percentile: float, sample: int, seed: int = 0) -> DistanceGate:
    """The gate from ``sample`` stored rows' similarity to their nearest other-patient case (see module doc)."""
    n = len(store)
    if n < 2:
        return DistanceGate(
            -1.0, percentile, 0, float("nan")
        )  # nothing to compare with: never abstain on distance
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, sample), replace=False))
    patients = store.metadata(["patient_id"]).column("patient_id").to_pylist()
    from cxr_embed.indexes import reconstruct_rows

    vectors = reconstruct_rows(store.index(), rows)
    ranked = retrieval.ranker_for(store).rank(vectors, None, min(n, 32))
    nearest = []
    for row, (ids, sims, _) in zip(rows, ranked, strict=True):
        own = patients[row]
        for hit, sim in zip(ids, sims, strict=True):
            if hit != row and (own is None or patients[hit] != own):
                nearest.append(float(sim))
                break
    if not nearest:
        return DistanceGate(-1.0, percentile, 0, float("nan"))
    values = np.asarray(nearest)
    return DistanceGate(
        float(np.percentile(values, percentile)), percentile, len(values), float(np.median(values))
    )


@dataclass(frozen=True)
class ImageQuery:
    """One decoded, preprocessed image waiting for the model."""

    tensor: torch.Tensor
    k: int = 0  # 0: embedding only
    exclude_patient: str | None = None


@dataclass(frozen=True)
class ImageAnswer:
    vector: np.ndarray
    probability: float | None
    neighbors: retrieval.SearchResult | None


def _stamp(path: os.PathLike) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class Engine:
    """Loads everything once; answers batches on its executor thread."""

    def __init__(self, config: ServeConfig, model: MedImageInsight | None = None):
        self.config = config
        self._store = Store.open(config.store)
        self._stamp = _stamp(self._store.path / MANIFEST)
        self._checked = time.monotonic()
        self._lock = threading.Lock()
        self.model = (
            model
            if model is not None
            else seams.load_model(
                self._store, config.model_dir, device=config.device, precision=config.precision
            )
        )
        if model is not None:
            self._store.check_compatible(
                model.model_id, model.checkpoint_sha256, model.preprocessor.fingerprint()
            )
        self.classifier = seams.load_classifier(self._store, config.classifier) if config.classifier else None
        self.gate = distance_gate(self._store, config.ood_percentile, config.ood_sample)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="cxr-serve-model")

    # -- the store, kept current

    @property
    def store(self) -> Store:
        """The open store; re-opened (at most every ``reload_seconds``) when ``store.json`` changed."""
        now = time.monotonic()
        if now - self._checked < self.config.reload_seconds:
            return self._store
        with self._lock:
            if now - self._checked >= self.config.reload_seconds:
                self._checked = now
                self._maybe_reload()
        return self._store

    def _maybe_reload(self) -> None:
        stamp = _stamp(self._store.path / MANIFEST)
        if stamp == self._stamp:
            return
        try:
            fresh = Store.open(self._store.path)
        except (
            StoreError
        ) as exc:  # mid-index: shards ahead of the FAISS index; keep answering from the old one
            log.info("store changed but is not consistent yet, keeping %d rows: %s", len(self._store), exc)
            return
        gate = distance_gate(fresh, self.config.ood_percentile, self.config.ood_sample)
        self._store, self._stamp, self.gate = fresh, stamp, gate
        log.info("store re-opened: %d rows", len(fresh))

    def describe(self) -> dict[str, Any]:
        """``GET /v1/store``: what answers come from (no paths, no rows)."""
        store = self.store
        return {
            "model_id": store.model_id,
            "checkpoint_sha256": store.checkpoint_sha256,
            "preprocess_fingerprint": store.preprocess_fingerprint,
            "dim": store.dim,
            "rows": len(store),
            "index_kind": store.index_kind,
            "classifiers": seams.saved_classifiers(store),
            "serving_classifier": self.classifier.describe() if self.classifier else None,
            "distance_gate": self.gate.describe(),
            "device": str(self.model.device),
            "precision": self.model.precision,
        }

    # -- work (executor thread only)

    def run_images(self, items: list[ImageQuery]) -> list[ImageAnswer]:
        """The micro-batch function: one forward, one classifier call, one search for the whole batch."""
        import torch

        store = self.store
        vectors = self.model.encode_images(torch.stack([q.tensor for q in items])).numpy()
        probs = self.classifier.predict_proba(vectors) if self.classifier is not None else None
        wanted = [i for i, q in enumerate(items) if q.k > 0]
        found: dict[int, retrieval.SearchResult] = {}
        if wanted and len(store):
            k = max(items[i].k for i in wanted)
            results = retrieval.search(
                store, vectors[wanted], k, None, [items[i].exclude_patient for i in wanted]
            )
            found = {i: _first(r, items[i].k) for i, r in zip(wanted, results, strict=True)}
        return [
            ImageAnswer(vectors[i], None if probs is None else float(probs[i]), found.get(i))
            for i in range(len(items))
        ]

    def search_texts(self, texts: list[str], k: int) -> list[retrieval.SearchResult]:
        store = self.store
        vectors = self.model.encode_texts(texts).numpy()
        return retrieval.search(store, vectors, k, queries=texts)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return self.model.encode_texts(texts).numpy()

    def search_ids(
        self, image_ids: list[str], k: int, exclude_same_patient: bool
    ) -> list[retrieval.SearchResult]:
        return retrieval.search_by_ids(self.store, image_ids, k, None, exclude_same_patient)


def _first(result: retrieval.SearchResult, k: int) -> retrieval.SearchResult:
    """``result`` cut to its first ``k`` neighbours, with the kNN vote recomputed on those."""
    if len(result.neighbors) <= k:
        return result
    kept = result.neighbors[:k]
    vote = retrieval.knn_vote([n.similarity for n in kept], [n.label for n in kept])
    return retrieval.SearchResult(
        kept, vote, result.strategy, result.candidates, result.query, result.excluded_patient
    )
