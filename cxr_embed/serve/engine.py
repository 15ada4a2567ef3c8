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
import pyarrow as pa
import pyarrow.compute as pc

from cxr_embed import retrieval
from cxr_embed.errors import StoreError
from cxr_embed.records import FINDINGS
from cxr_embed.serve import loaders
from cxr_embed.serve.config import ServeConfig
from cxr_embed.store import MANIFEST, Store, read_manifest

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
class Hit:
    """One neighbour as the API shows it: pseudonymous ids and labels, never the stored path."""

    rank: int
    image_id: str
    patient_id: str | None
    similarity: float
    label: int | None
    findings: tuple[str, ...] | None
    view: str | None


@dataclass(frozen=True)
class Hits:
    neighbors: list[Hit]
    probability_abnormal: float | None  # kNN vote (retrieval.knn_vote)
    excluded_patient: str | None = None


@dataclass(frozen=True)
class ImageAnswer:
    vector: np.ndarray
    probability: float | None
    neighbors: Hits | None


_HIT_COLUMNS = ("image_id", "patient_id", "label", "view", *FINDINGS)


class StoreView:
    """The neighbour columns of a store held in memory, searched through its :class:`retrieval.Ranker`.

    Why not :func:`retrieval.search`: it opens a DuckDB connection per call to apply SQL filters and
    fetch rows (tens of ms, more than a tiny-model forward); the service needs no SQL, only patient
    exclusion, which is a comparison of dictionary codes here. Same ranking, same vote.
    """

    def __init__(self, store: Store, ood_percentile: float, ood_sample: int):
        self.store = store
        self.ranker = retrieval.ranker_for(store)
        self.gate = distance_gate(store, ood_percentile, ood_sample)
        self.meta = store.metadata(list(_HIT_COLUMNS))
        encoded = pc.dictionary_encode(self.meta.column("patient_id")).combine_chunks()
        self._codes = pc.fill_null(encoded.indices, -1).to_numpy().astype(np.int64)
        self._code_of = {p: i for i, p in enumerate(encoded.dictionary.to_pylist())}

    def _mask(self, patient: str) -> np.ndarray | None:
        code = self._code_of.get(patient)
        return None if code is None else self._codes != code

    def search(self, vectors: np.ndarray, k: int, exclude: list[str | None]) -> list[Hits]:
        """k nearest stored cases per row of ``vectors`` (unit-norm), without ``exclude[i]``'s images."""
        if all(p is None for p in exclude):
            ranked = self.ranker.rank(vectors, None, k)
        else:
            ranked = [self.ranker.rank(vectors[i : i + 1], self._mask(p) if p else None, k)[0]
                      for i, p in enumerate(exclude)]  # fmt: skip
        out = []
        for (ids, sims, _), patient in zip(ranked, exclude, strict=True):
            rows = self.meta.take(pa.array(ids, pa.int64())).to_pylist()
            hits = [
                _hit(rank, row, float(sim)) for rank, (row, sim) in enumerate(zip(rows, sims, strict=True), 1)
            ]
            vote = retrieval.knn_vote([h.similarity for h in hits], [h.label for h in hits])
            out.append(Hits(hits, vote, patient))
        return out


def _hit(rank: int, row: dict, similarity: float) -> Hit:
    flags = [row[f] for f in FINDINGS]
    findings = (
        None if any(f is None for f in flags) else tuple(f for f, v in zip(FINDINGS, flags, strict=True) if v)
    )
    return Hit(rank, row["image_id"], row["patient_id"], similarity, row["label"], findings, row["view"])


def _rows_changed(store: Store) -> bool:
    """Whether ``store.json`` on disk names other rows or another index than ``store`` was opened with."""
    try:
        disk = read_manifest(store.path)
    except StoreError:
        return True
    return any(disk.get(k) != store.manifest.get(k) for k in ("updated_at", "shards", "index"))


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
        store = Store.open(config.store)
        self._stamp = _stamp(store.path / MANIFEST)
        if model is None:
            model = loaders.load_model(
                store, config.model_dir, device=config.device, precision=config.precision
            )
        store.check_compatible(model.model_id, model.checkpoint_sha256, model.preprocessor.fingerprint())
        self.model = model
        self.classifier = (
            loaders.load_classifier(store, config.classifier, config.classifier_run)
            if config.classifier
            else None
        )
        self.view = StoreView(store, config.ood_percentile, config.ood_sample)
        self._checked = time.monotonic()
        self._lock = threading.Lock()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="cxr-serve-model")
        self.decode_executor = ThreadPoolExecutor(
            config.decode_workers, thread_name_prefix="cxr-serve-decode"
        )

    # -- the store, kept current

    @property
    def store(self) -> Store:
        return self.current_view().store

    @property
    def gate(self) -> DistanceGate:
        return self.current_view().gate

    def current_view(self) -> StoreView:
        """The store's view; re-built (at most every ``reload_seconds``) when ``store.json`` changed."""
        now = time.monotonic()
        if now - self._checked >= self.config.reload_seconds:
            with self._lock:
                if now - self._checked >= self.config.reload_seconds:
                    self._checked = now
                    self._maybe_reload()
        return self.view

    def _maybe_reload(self) -> None:
        stamp = _stamp(self.view.store.path / MANIFEST)
        if stamp == self._stamp:
            return
        if not _rows_changed(self.view.store):  # only result parts were added (the audit, a classify run)
            self._stamp = stamp
            return
        try:
            fresh = Store.open(self.view.store.path)
        except (
            StoreError
        ) as exc:  # mid-index: shards ahead of the FAISS index; keep answering from the old one
            log.info(
                "store changed but is not consistent yet, keeping %d rows: %s", len(self.view.store), exc
            )
            return
        self.view = StoreView(fresh, self.config.ood_percentile, self.config.ood_sample)  # one reference swap
        self._stamp = stamp
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
            "classifiers": loaders.saved_classifiers(store),
            "serving_classifier": self.classifier.describe() if self.classifier else None,
            "distance_gate": self.gate.describe(),
            "device": str(self.model.device),
            "precision": self.model.precision,
        }

    # -- work (executor thread only)

    def run_images(self, items: list[ImageQuery]) -> list[ImageAnswer]:
        """The micro-batch function: one forward, one classifier call, one search for the whole batch."""
        import torch

        view = self.current_view()
        vectors = self.model.encode_images(torch.stack([q.tensor for q in items])).numpy()
        probs = self.classifier.predict_proba(vectors) if self.classifier is not None else None
        wanted = [i for i, q in enumerate(items) if q.k > 0]
        found: dict[int, Hits] = {}
        if wanted and len(view.store):
            k = max(items[i].k for i in wanted)
            results = view.search(vectors[wanted], k, [items[i].exclude_patient for i in wanted])
            found = {i: _first(r, items[i].k) for i, r in zip(wanted, results, strict=True)}
        return [
            ImageAnswer(vectors[i], None if probs is None else float(probs[i]), found.get(i))
            for i in range(len(items))
        ]

    def search_texts(self, texts: list[str], k: int) -> list[Hits]:
        view = self.current_view()
        return view.search(self.model.encode_texts(texts).numpy(), k, [None] * len(texts))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return self.model.encode_texts(texts).numpy()

    def search_ids(self, image_ids: list[str], k: int, exclude_same_patient: bool) -> list[Hits]:
        """Neighbours of stored images (found with SQL: unknown ids give a QueryError naming them)."""
        view = self.current_view()
        found = retrieval.stored_queries(view.store, image_ids)
        vectors = np.stack([q.vector for q in found])
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return view.search(vectors, k, [q.patient_id if exclude_same_patient else None for q in found])


def _first(result: Hits, k: int) -> Hits:
    """``result`` cut to its first ``k`` neighbours, with the kNN vote recomputed on those."""
    if len(result.neighbors) <= k:
        return result
    kept = result.neighbors[:k]
    vote = retrieval.knn_vote([n.similarity for n in kept], [n.label for n in kept])
    return Hits(kept, vote, result.excluded_patient)
