"""The index job: dataset → parallel decode + preprocess → MedImageInsight → committed store shards.

Pipeline (local engine)::

    read_dataset (listing, bad rows → errors)
      → StoreWriter.pending (skip what the store already holds: this is what makes reruns resume)
      → DataLoader workers: read_image + model.preprocessor per image, in parallel processes,
        pinned memory on CUDA, ``prefetch`` batches queued per worker
      → model.encode_images under inference mode (autocast bf16/fp16 when asked)
      → StoreWriter.append every ``shard_size`` rows (one atomic shard commit)
      → StoreWriter.finalize (build or grow the FAISS index)

Why workers: decoding and resizing a 1024² PNG costs ~5 ms per image per core, while an H200 embeds
an image in under 1 ms, so decoding in the main process would starve the GPU. A file that fails to
decode inside a worker comes back as a failure marker (never an exception, which would kill the
whole DataLoader), and the collate function splits markers from pixels, so it becomes a row in
``errors.parquet`` and the job carries on.

Order is deterministic (DataLoader keeps order; row_ids follow the listing), so a run killed at any
point and rerun ends with the same rows, row_ids and embeddings as one uninterrupted run.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxr_embed.errors import ConfigError, CxrEmbedError, DependencyError
from cxr_embed.indexes import resolve_kind
from cxr_embed.progress import progress_bar
from cxr_embed.records import ImageRecord, ReadFailure, read_dataset
from cxr_embed.store import Store, StoreLock, StoreWriter, recorded_model_dir

if TYPE_CHECKING:
    import torch

    from cxr_embed.model import MedImageInsight
    from cxr_embed.preprocessing import Preprocessor

ENGINES = ("local", "ray")


@dataclass
class IndexConfig:
    """Options of ``cxr-embed index`` (the CLI flags map 1:1)."""

    dataset: str = "auto"
    model_dir: str | Path | None = None
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 32
    workers: int | None = None  # None: a sensible number for the device (see default_workers)
    limit: int | None = None  # only the first N listed images (reruns with the same limit resume)
    shard_size: int = 4096  # rows per committed shard: the unit of crash-safety
    index: str | None = None  # flat|ivf|hnsw|ivfpq|auto; None keeps the store's choice (auto when new)
    engine: str = "local"
    prefetch: int = 4  # batches queued per worker
    ray_address: str | None = None  # --engine ray: None = $RAY_ADDRESS, else a new local instance
    gpus_per_worker: float | None = None  # --engine ray: GPUs per model actor (None: 1 when GPUs exist)
    cpus_per_worker: float = 1.0  # --engine ray: CPUs per decode task / actor
    prune: bool = False  # remove stored rows whose image is no longer in the source

    def check(self) -> None:
        """Refuse impossible values before any work (ConfigError naming the flag)."""
        for name in ("batch_size", "shard_size", "prefetch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers must be 0 (decode in the main process) or more, got {self.workers}.")
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"--limit must be 0 or more, got {self.limit}.")
        if self.engine not in ENGINES:
            raise ConfigError(f"Unknown engine {self.engine!r}; use one of {', '.join(ENGINES)}.")
        if self.index is not None:
            resolve_kind(self.index, 0)
        ray_only = self.ray_address is not None or self.gpus_per_worker is not None or self.cpus_per_worker != 1.0
        if ray_only and self.engine != "ray":
            raise ConfigError("--address, --gpus-per-worker and --cpus-per-worker only apply with --engine ray.")


@dataclass
class IndexSummary:
    """What one ``cxr-embed index`` run did (also printed as its final summary / JSON)."""

    store: str
    source: str
    model_id: str
    device: str
    precision: str
    listed: int  # images the reader found (after --limit)
    already_stored: int  # skipped because a previous run stored them
    embedded: int  # new rows committed by this run
    failed: int  # inputs that failed in this run (reader + decode + encode)
    failures_by_stage: dict[str, int]
    rows: int  # rows in the store now
    errors_in_store: int  # rows of errors.parquet now
    index_kind: str | None
    seconds: float  # whole run, model load and index build included
    embed_seconds: float  # the decode → forward → write loop only
    images_per_s: float  # embedded / embed_seconds
    engine: str = "local"
    notes: list[str] = field(default_factory=list)
    updated: int = 0  # stored rows whose metadata changed in the source (rewritten, not re-embedded)
    missing_from_source: int = 0  # stored rows whose image the source no longer lists
    pruned: int = 0  # of those, removed (--prune)


def default_workers(device_type: str) -> int:
    """Decode workers: most cores when a GPU does the forward; few on CPU, where the forward needs them."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device_type == "cuda":
        return max(1, min(16, cpus - 1))
    return max(1, min(4, cpus // 4))


# ----------------------------------------------------------------------------- decode stage


@dataclass(frozen=True)
class FailedItem:
    """What a worker returns instead of pixels: picklable, so it crosses the process boundary."""

    stage: str
    reason: str


class DecodeDataset:
    """``records[i]`` → (i, preprocessed (3,H,W) tensor) or (i, :class:`FailedItem`). Never raises."""

    def __init__(self, records: list[ImageRecord], preprocessor: Preprocessor):
        self.records = records
        self.preprocessor = preprocessor

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        from cxr_embed.imageio import read_image

        path = self.records[i].path
        try:
            img = read_image(path)
        except Exception as exc:  # decoder boundary: whatever a bad file raises, it is that file's failure
            return i, FailedItem("decode", _reason(exc))
        try:
            return i, self.preprocessor(img)
        except Exception as exc:  # same boundary for odd pixel data that decodes but cannot be resized
            return i, FailedItem("preprocess", _reason(exc))


def _reason(exc: Exception) -> str:
    return str(exc) if isinstance(exc, CxrEmbedError) else f"{type(exc).__name__}: {exc}"


def collate(items: list[tuple[int, Any]]) -> dict[str, Any]:
    """Stack the good items; keep failures aside (a dict, so ``pin_memory`` pins just the tensor)."""
    import torch

    good = [(i, t) for i, t in items if not isinstance(t, FailedItem)]
    return {
        "indices": [i for i, _ in good],
        "pixels": torch.stack([t for _, t in good]) if good else None,
        "failed": [(i, t.stage, t.reason) for i, t in items if isinstance(t, FailedItem)],
    }


def _worker_init(_: int) -> None:
    import torch

    torch.set_num_threads(1)  # one decode per worker process; N workers already fill N cores


def make_loader(records: list[ImageRecord], preprocessor: Preprocessor, *, batch_size: int, workers: int,
                pin_memory: bool, prefetch: int) -> torch.utils.data.DataLoader:
    """The ordered, parallel decode + preprocess stage, yielding :func:`collate` dicts."""
    from torch.utils.data import DataLoader

    return DataLoader(
        DecodeDataset(records, preprocessor),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=prefetch if workers > 0 else None,
        worker_init_fn=_worker_init if workers > 0 else None,
    )


# ----------------------------------------------------------------------------- the job


def run_index(source: str | Path, store_dir: str | Path, config: IndexConfig | None = None, progress: bool = True,
              *, model: MedImageInsight | None = None) -> IndexSummary:
    """Embed every image under ``source`` that ``store_dir`` does not hold yet, then (re)index.

    ``model`` lets a caller pass an already loaded model (benchmarks, notebooks); otherwise
    ``config.model_dir`` / device / precision are loaded. Raises StoreLockedError when another
    writer is active and StoreMismatchError when the store was made with another model.
    """
    config = config or IndexConfig()
    config.check()
    if config.engine == "ray":
        return _run_ray(source, store_dir, config, progress)
    import torch

    from cxr_embed.model import MedImageInsight

    start = time.perf_counter()
    read_failures: list[ReadFailure] = []
    records = read_dataset(source, config.dataset, errors=read_failures)
    if config.limit is not None:
        records = records[: config.limit]
    lock = StoreLock(store_dir).acquire()  # before the model loads: a second writer is refused at once
    try:
        if model is None:
            model_dir = config.model_dir or recorded_model_dir(store_dir)  # a rerun finds the store's model
            model = MedImageInsight.load(model_dir, device=config.device, precision=config.precision)
    except BaseException:
        lock.release()
        raise
    workers = default_workers(model.device.type) if config.workers is None else config.workers
    failures: list[ReadFailure] = list(read_failures)
    with lock, StoreWriter(store_dir, model_id=model.model_id, checkpoint_sha256=model.checkpoint_sha256,
                           preprocess_fingerprint=model.preprocessor.fingerprint(), dim=model.embed_dim,
                           index_kind=config.index, model_dir=model.model_dir, lock=lock) as writer:
        todo = writer.pending(records)
        writer.reconcile(records, prune=config.prune, complete=config.limit is None)
        writer.record_failures(read_failures)
        loader = make_loader(todo, model.preprocessor, batch_size=config.batch_size, workers=workers,
                             pin_memory=model.device.type == "cuda", prefetch=config.prefetch)
        embed_start = time.perf_counter()
        batcher = ShardBuffer(writer, config.shard_size)
        with progress_bar(len(todo), "Embedding", progress) as bar, torch.inference_mode():
            for batch in loader:
                failed = [ReadFailure(todo[i].image_id, todo[i].path, stage, reason) for i, stage, reason in batch["failed"]]
                if batch["pixels"] is not None:
                    recs = [todo[i] for i in batch["indices"]]
                    emb = model.encode_images(batch["pixels"].to(model.device, non_blocking=True)).numpy()
                    finite = np.isfinite(emb).all(axis=1)
                    failed += [ReadFailure(r.image_id, r.path, "encode", f"non-finite embedding at {model.precision}; "
                               "retry with --precision fp32") for r, ok in zip(recs, finite, strict=True) if not ok]
                    batcher.add([r for r, ok in zip(recs, finite, strict=True) if ok], emb[finite])
                writer.record_failures(failed)
                failures += failed
                bar.advance(len(batch["indices"]) + len(batch["failed"]))
            batcher.flush()
        embed_seconds = time.perf_counter() - embed_start
        store = writer.finalize()
    return summarize(store, source, model.model_id, str(model.device), model.precision, listed=len(records),
                     pending=len(todo), writer=writer, failures=failures, start=start, embed_seconds=embed_seconds,
                     engine="local")


def summarize(store: Store, source: str | Path, model_id: str, device: str, precision: str, *, listed: int,
              pending: int, writer: StoreWriter, failures: list[ReadFailure], start: float, embed_seconds: float,
              engine: str, notes: list[str] | None = None) -> IndexSummary:
    """The final summary of one run, shared by the local and the Ray engine so both report alike."""
    return IndexSummary(
        store=str(store.path),
        source=str(source),
        model_id=model_id,
        device=device,
        precision=precision,
        listed=listed,
        already_stored=listed - pending,
        embedded=writer.rows_added,
        failed=len(failures),
        failures_by_stage=dict(Counter(f.stage for f in failures)),
        rows=len(store),
        errors_in_store=store.errors().num_rows,
        index_kind=store.index_kind,
        seconds=round(time.perf_counter() - start, 3),
        embed_seconds=round(embed_seconds, 3),
        images_per_s=round(writer.rows_added / embed_seconds, 2) if writer.rows_added and embed_seconds > 0 else 0.0,
        engine=engine,
        notes=[*(notes or []), *writer.repairs],
        updated=writer.reconciled.updated,
        missing_from_source=writer.reconciled.missing_from_source,
        pruned=writer.reconciled.pruned,
    )


class ShardBuffer:
    """Accumulate (records, embeddings) and commit exactly ``shard_size`` rows per shard."""

    def __init__(self, writer: StoreWriter, shard_size: int):
        self.writer = writer
        self.shard_size = shard_size
        self.records: list[ImageRecord] = []
        self.chunks: list[np.ndarray] = []

    def add(self, records: list[ImageRecord], embeddings: np.ndarray) -> None:
        self.records += records
        self.chunks.append(embeddings)
        while len(self.records) >= self.shard_size:
            emb = np.concatenate(self.chunks)
            self.writer.append(self.records[: self.shard_size], emb[: self.shard_size])
            self.records, self.chunks = self.records[self.shard_size :], [emb[self.shard_size :]]

    def flush(self) -> None:
        if self.records:
            self.writer.append(self.records, np.concatenate(self.chunks))
        self.records, self.chunks = [], []


def _run_ray(source: str | Path, store_dir: str | Path, config: IndexConfig, progress: bool) -> IndexSummary:
    if importlib.util.find_spec("cxr_embed.ray_engine") is None:
        raise DependencyError(
            "The Ray engine is not available in this installation (no cxr_embed.ray_engine). "
            "Use --engine local, or install a cxr-embed version with Ray support: pip install 'cxr-embed[ray]'."
        )
    from cxr_embed.ray_engine import run_index_ray

    return run_index_ray(source, store_dir, config, address=config.ray_address, gpus_per_worker=config.gpus_per_worker,
                         cpus_per_worker=config.cpus_per_worker, progress=progress)
