"""The local engine of the index job: DataLoader decode workers → one model on one device.

Supplies only the middle stages of :func:`cxr_embed.pipeline.run_job`::

    DataLoader workers (cxr_embed.decode): read_image + resize per image, in parallel processes,
        uint8 batches, pinned memory on CUDA, ``prefetch`` batches queued per worker
      → host→device copy (non_blocking from pinned memory), Preprocessor.normalize on the device
      → model.encode_images (autocast bf16/fp16 when asked), embeddings left on the device
      → an asynchronous device→host copy the pipeline's writer thread waits for

Why workers: decoding and resizing a 1024² PNG costs ~5 ms per image per core, while an H200 embeds
an image in under 1 ms, so decoding in the main process would starve the GPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from cxr_embed.decode import make_loader
from cxr_embed.pipeline import EmbeddedBatch, IndexConfig, ModelIdentity
from cxr_embed.records import ImageRecord

if TYPE_CHECKING:
    import torch

    from cxr_embed.model import MedImageInsight


def default_workers(device_type: str) -> int:
    """Decode workers: most cores when a GPU does the forward; few on CPU, where the forward needs them."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device_type == "cuda":
        return max(1, min(16, cpus - 1))
    return max(1, min(4, cpus // 4))


def model_identity(model: MedImageInsight) -> ModelIdentity:
    """The identity a store made by ``model`` is stamped with."""
    return ModelIdentity(
        model.model_id, model.checkpoint_sha256, model.preprocessor.fingerprint(), model.embed_dim, model.model_dir
    )


class LocalEngine:
    """DataLoader workers + one loaded model (``model``, or loaded from ``config``)."""

    name = "local"

    def __init__(self, config: IndexConfig, model: MedImageInsight | None = None):
        if model is None:
            from cxr_embed.model import MedImageInsight

            model = MedImageInsight.load(config.model_dir, device=config.device, precision=config.precision)
        self.model = model
        self.config = config
        self.identity = model_identity(model)
        self.precision = model.precision
        self.workers = default_workers(model.device.type) if config.workers is None else config.workers

    @contextmanager
    def session(self, todo: list[ImageRecord]) -> Iterator[Iterator[EmbeddedBatch]]:
        yield self._batches(todo)

    def describe(self) -> tuple[str, list[str]]:
        return str(self.model.device), []

    def _batches(self, todo: list[ImageRecord]) -> Iterator[EmbeddedBatch]:
        import torch

        model, on_cuda = self.model, self.model.device.type == "cuda"
        loader = make_loader(
            todo,
            model.preprocessor,
            batch_size=self.config.batch_size,
            workers=self.workers,
            pin_memory=on_cuda,
            prefetch=self.config.prefetch,
        )
        for batch in loader:
            if batch.pixels is None:
                yield EmbeddedBatch([], _no_embeddings, batch.failures)
                continue
            with torch.inference_mode():
                pixels = model.preprocessor.normalize(batch.pixels.to(model.device, non_blocking=True))
                emb = model.encode_images(pixels, keep_on_device=True)
            yield EmbeddedBatch([todo[i] for i in batch.indices], to_host(emb), batch.failures)


def to_host(emb: torch.Tensor) -> Callable[[], np.ndarray]:
    """Start copying ``emb`` to the host; the returned callable waits for the copy and gives the array.

    On CUDA the copy goes to pinned memory with ``non_blocking`` and a recorded event, so the loop
    queues the next batch's forward at once and only the writer thread waits. On CPU it is free.
    """
    import torch

    if emb.device.type != "cuda":
        return emb.numpy
    host = torch.empty(emb.shape, dtype=emb.dtype, pin_memory=True)
    host.copy_(emb, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> np.ndarray:
        copied.synchronize()
        return host.numpy()

    return wait


def _no_embeddings() -> np.ndarray:
    return np.empty((0, 0), dtype=np.float32)
