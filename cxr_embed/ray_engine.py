"""The Ray engine of ``cxr-embed index --engine ray``: the same job, scaled out over a Ray cluster.

Pipeline::

    driver: read_dataset → StoreWriter.pending (resume: only what the store lacks)
      → Ray Data: from_items(index, path) in input order
          → map_batches(decode_batch)     CPU tasks: read_image + preprocessing; failures become
                                          (stage, reason) columns, never exceptions
          → map_batches(EmbedActor)       an actor pool, one loaded model per actor (one per GPU,
                                          or a small pool of CPU actors without GPUs)
      → driver: iter_batches (order preserved) → StoreWriter.append every ``shard_size`` rows
      → StoreWriter.finalize (FAISS index built after the embedding stage)

Why the driver writes: :class:`~cxr_embed.store.StoreWriter` (lock, dense row_ids, atomic manifest,
errors.parquet) is the store's single writer, so committing from one process keeps the Ray store
byte-for-byte the same format, with the same row order and resume semantics, as the local engine's.
Only embeddings (D float32 per image) travel back to the driver, so it is never the bottleneck: at
1024 dims that is 4 KiB per image, a few MB/s even at thousands of images/s.

Ray fuses the decode tasks into the embedding actors when both ask for the same resources (a CPU-only
pool with ``cpus_per_worker=1``); that is right there: a CPU forward costs ~1000x the decode, and
fusion saves shipping 2.7 MB of pixels per image through the object store. On GPUs the actors ask for
a GPU, so decoding stays on separate CPU tasks that keep the GPUs fed.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxr_embed import errors
from cxr_embed.errors import ConfigError, CxrEmbedError, DependencyError, StoreMismatchError
from cxr_embed.job import DecodeDataset, FailedItem, IndexConfig, IndexSummary, ShardBuffer, summarize
from cxr_embed.listing import failure_for, list_source
from cxr_embed.progress import progress_bar
from cxr_embed.records import ImageRecord, ReadFailure
from cxr_embed.store import StoreWriter, local_store_path

if TYPE_CHECKING:
    from cxr_embed.model import MedImageInsight
    from cxr_embed.preprocessing import Preprocessor

CPU_POOL_MAX = 4
"""At most this many CPU model actors by default: each holds a model copy (2.5 GB at full size)."""
MAX_BLOCKS = 10_000
"""Cap on input blocks: enough to stream and balance, few enough that scheduling stays cheap."""


@dataclass(frozen=True)
class PoolPlan:
    """How many model actors run where: what ``--gpus-per-worker`` / ``--cpus-per-worker`` resolve to."""

    actors: int
    device: str  # "cuda" | "cpu": what each actor loads the model on
    gpus_per_worker: float
    cpus_per_worker: float

    def describe(self) -> str:
        gpus = f"{self.gpus_per_worker:g} GPU + " if self.gpus_per_worker else ""
        return f"{self.actors} model actor(s) on {self.device}, {gpus}{self.cpus_per_worker:g} CPU each"


def plan_pool(resources: dict[str, float], device: str, gpus_per_worker: float | None, cpus_per_worker: float) -> PoolPlan:
    """Size the actor pool from the cluster's resources (``ray.cluster_resources()``).

    GPUs: one actor per ``gpus_per_worker`` GPUs (default 1; 0.5 packs two models per GPU).
    CPU only: up to :data:`CPU_POOL_MAX` actors, always leaving a CPU free so decode tasks can run.
    Raises ConfigError for requests the cluster cannot satisfy (better than a job that hangs
    waiting for resources that never come).
    """
    if cpus_per_worker <= 0:
        raise ConfigError(f"--cpus-per-worker must be positive, got {cpus_per_worker:g}.")
    if gpus_per_worker is not None and gpus_per_worker < 0:
        raise ConfigError(f"--gpus-per-worker must be 0 (CPU actors) or more, got {gpus_per_worker:g}.")
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    wants_cuda = device.startswith("cuda")
    use_gpu = device != "cpu" and gpus_per_worker != 0 and (gpus > 0 or wants_cuda)
    if use_gpu:
        per = 1.0 if gpus_per_worker is None else gpus_per_worker
        if gpus < per:
            raise ConfigError(
                f"The Ray cluster has {gpus:g} GPU(s) but each model actor asks for {per:g} (--device {device}). "
                "Start the workers with GPUs (`ray start --num-gpus N`), lower --gpus-per-worker, or use --device cpu."
            )
        return PoolPlan(int(gpus // per), "cuda", per, cpus_per_worker)
    if wants_cuda:
        raise ConfigError(f"--device {device} conflicts with --gpus-per-worker 0; use --device cpu or give each actor a GPU.")
    if cpus_per_worker > max(1.0, cpus - 1):
        raise ConfigError(
            f"--cpus-per-worker {cpus_per_worker:g} leaves no CPU for decoding on a Ray cluster with {cpus:g} CPU(s); "
            f"use at most {max(1.0, cpus - 1):g}."
        )
    actors = max(1, min(CPU_POOL_MAX, int((cpus - 1) // cpus_per_worker)))
    return PoolPlan(actors, "cpu", 0.0, cpus_per_worker)


# ----------------------------------------------------------------------------- stages (run on Ray workers)


def _path_record(path: str) -> ImageRecord:
    """The minimal record :class:`DecodeDataset` needs (it reads only ``.path``): keeps Ray rows small."""
    return ImageRecord(image_id=path, path=path, patient_id=None, study=None, split=None, label=None,
                       findings=None, sex=None, age=None, view=None, source="")


def decode_batch(batch: dict[str, np.ndarray], preprocessor: Preprocessor) -> dict[str, np.ndarray]:
    """Stage 1 (CPU tasks): paths → preprocessed pixels; a bad file fills ``stage``/``reason`` instead.

    Returns columns ``i``, ``pixels`` (B, 3, S, S) float32 (zeros for failed rows), ``stage`` ("" when
    the image decoded) and ``reason``. Uses the local engine's :class:`DecodeDataset`, so both engines
    decode and classify failures identically.
    """
    data = DecodeDataset([_path_record(str(p)) for p in batch["path"]], preprocessor)
    n, size = len(data), preprocessor.image_size
    pixels = np.zeros((n, 3, size, size), dtype=np.float32)
    stage, reason = np.full(n, "", dtype=object), np.full(n, "", dtype=object)
    for k in range(n):
        _, item = data[k]
        if isinstance(item, FailedItem):
            stage[k], reason[k] = item.stage, item.reason
        else:
            pixels[k] = item.numpy()
    return {"i": batch["i"], "pixels": pixels, "stage": stage, "reason": reason}


class EmbedActor:
    """Stage 2 (actor pool): loads the model once per actor and embeds every batch it is given.

    The actor checks that its model is the one the driver stamped the store with (a node with another
    checkpoint at the same path would otherwise mix models into one store).
    """

    def __init__(self, model_dir: str, device: str, precision: str, identity: tuple[str, str, str]):
        from cxr_embed.model import MedImageInsight

        self.model = MedImageInsight.load(model_dir, device=device, precision=precision)
        found = _identity(self.model)
        if found != identity:
            raise StoreMismatchError(
                f"The model folder {model_dir} on Ray node {socket.gethostname()} is {found[0]} (checkpoint "
                f"{found[1][:12]}…), but the driver's is {identity[0]} ({identity[1][:12]}…). Every node must see "
                "the same model folder at the same path (a shared filesystem, or the same `cxr-embed model pull`)."
            )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Columns ``i``, ``embedding`` (B, D) float32, ``stage``, ``reason`` (``encode`` for non-finite output)."""
        import torch

        ok = batch["stage"] == ""
        stage, reason = batch["stage"].copy(), batch["reason"].copy()
        emb = np.zeros((len(ok), self.model.embed_dim), dtype=np.float32)
        if ok.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            if self.model.device.type == "cuda":
                pixels = pixels.pin_memory()
            with torch.inference_mode():
                emb[ok] = self.model.encode_images(pixels.to(self.model.device, non_blocking=True)).numpy()
            bad = ok & ~np.isfinite(emb).all(axis=1)
            stage[bad] = "encode"
            reason[bad] = f"non-finite embedding at {self.model.precision}; retry with --precision fp32"
            emb[bad] = 0.0
        return {"i": batch["i"], "embedding": emb, "stage": stage, "reason": reason}


# ----------------------------------------------------------------------------- driver


def describe_model(model_dir: str | Path | None) -> MedImageInsight:
    """The model's identity (id, checkpoint sha256, preprocessing, dim) without loading its weights.

    The driver needs it to open the store; the weights live only in the actors. The module is built
    on PyTorch's meta device (no memory), and the checkpoint hash is cached by ``sha256_file``.
    """
    import torch

    from cxr_embed.model import MedImageInsight, resolve_model_dir
    from cxr_embed.model.config import load_config
    from cxr_embed.model.files import CHECKPOINT_RELPATH, CONFIG_NAME, sha256_file
    from cxr_embed.model.unicl import UniCL

    folder = resolve_model_dir(model_dir)
    with torch.device("meta"):
        module = UniCL(load_config(folder / CONFIG_NAME))
    return MedImageInsight(module, folder, sha256_file(folder / CHECKPOINT_RELPATH), torch.device("cpu"))


def _identity(model: MedImageInsight) -> tuple[str, str, str]:
    return model.model_id, model.checkpoint_sha256, model.preprocessor.fingerprint()


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise DependencyError(
            "--engine ray needs Ray, which is not installed. Install it with: pip install 'cxr-embed[ray]' "
            "(or pip install 'ray[data]'), or use --engine local."
        ) from None
    return ray


def _connect(ray: Any, address: str | None) -> bool:
    """Join ``address`` (or start a local instance); True when this call started Ray (so it shuts it down).

    ``address=None`` takes ``$RAY_ADDRESS``, else starts a fresh local instance ("local"): unlike a bare
    ``ray.init()`` it never joins whatever cluster happens to run on this machine (pass "auto" for that).
    Usage statistics are off unless the user opted in: radiology sites often forbid any phone-home.
    """
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    local = {"include_dashboard": False} if target == "local" else {}
    try:
        ray.init(address=target, logging_level=logging.WARNING, **local)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise ConfigError(
            f"Cannot connect to Ray at {target!r} ({exc}). Start a cluster with "
            "`ray start --head` and give its address: auto (this machine), HOST:6379 or ray://HOST:10001. A cluster "
            "with token authentication (the default of `ray start`) also needs RAY_AUTH_MODE=token here."
        ) from exc
    return True


def _pipeline(ray: Any, todo: list[ImageRecord], model: MedImageInsight, plan: PoolPlan, model_dir: Path,
              config: IndexConfig) -> Any:
    """The Ray Data plan: input order preserved, so row_ids match the local engine's exactly."""
    rows = [{"i": i, "path": rec.path} for i, rec in enumerate(todo)]
    ds = ray.data.from_items(rows, override_num_blocks=min(MAX_BLOCKS, math.ceil(len(rows) / config.batch_size)))
    ds = ds.map_batches(decode_batch, batch_size=config.batch_size, batch_format="numpy",
                        fn_kwargs={"preprocessor": model.preprocessor}, concurrency=config.workers or None)
    ds = ds.map_batches(
        EmbedActor,
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_gpus=plan.gpus_per_worker or None,
        num_cpus=plan.cpus_per_worker,
        fn_constructor_kwargs={"model_dir": str(model_dir.resolve()), "device": plan.device, "precision": config.precision,
                               "identity": _identity(model)},
    )
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False  # our bar (images/s on stderr) replaces Ray's per-operator bars
    return ds


def _results(ray: Any, ds: Any, prefetch: int) -> Iterator[dict[str, np.ndarray]]:
    """Embedded batches in input order; a failed Ray job becomes a CxrEmbedError the user can act on."""
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=prefetch)
    except ray.exceptions.RayError as exc:
        cause = remote_error(exc)
        if cause is not None:
            raise cause from None
        raise CxrEmbedError(
            f"The Ray job failed: {exc}. Shards committed so far are kept; fix the cause and rerun the same "
            "command to resume."
        ) from exc


_REMOTE_ERROR = re.compile(r"cxr_embed\.errors\.(\w+): (.+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def remote_error(exc: BaseException) -> CxrEmbedError | None:
    """The CxrEmbedError a Ray worker raised, rebuilt from the traceback text Ray forwards.

    Ray Data does not forward the exception object of a failed actor constructor (ActorDiedError) or
    UDF (UserCodeException): only the remote traceback survives, as text. Its last
    ``cxr_embed.errors.<Class>: <message>`` line is the user-facing error (e.g. a node without the
    model folder: ModelNotFoundError), so it is re-raised as that class instead of a Ray traceback.
    """
    text, seen = [], exc
    while seen is not None and len(text) < 8:
        text.append(_ANSI.sub("", str(seen)))
        seen = seen.__cause__ or getattr(seen, "cause", None)
    found = _REMOTE_ERROR.findall("\n".join(text))
    if not found:
        return None
    name, message = found[-1]
    cls = getattr(errors, name, None)
    return cls(message.strip()) if isinstance(cls, type) and issubclass(cls, CxrEmbedError) else None


def run_index_ray(source: str | Path, store_dir: str | Path, config: IndexConfig | None = None, *,
                  address: str | None = None, gpus_per_worker: float | None = None, cpus_per_worker: float = 1.0,
                  progress: bool = True) -> IndexSummary:
    """Embed every image under ``source`` that ``store_dir`` lacks on a Ray cluster, then (re)index.

    Same inputs, store and resume semantics as :func:`cxr_embed.job.run_index`; ``address`` is
    ``None`` (``$RAY_ADDRESS``, else a new local instance), ``"auto"`` (the cluster running on this
    machine), ``"host:6379"`` or ``"ray://host:10001"``; a Ray already initialised in this process is reused. The driver
    reads the listing and the model identity, so it needs the source listing and the model folder;
    every worker needs the image files and the model folder at the same paths. ``config.workers``
    caps concurrent decode tasks (default: Ray decides); ``config.prefetch`` is the number of result
    batches the driver prefetches. A rerun with nothing left to embed does not start Ray at all.
    """
    import torch

    from cxr_embed.precision import check_precision

    config = config or IndexConfig(engine="ray")
    config.check()
    ray = _import_ray()
    store_path = local_store_path(store_dir)
    start = time.perf_counter()
    listing = list_source(source, config.dataset, options=config.reader_options, link_file=config.link_file,
                          cache_dir=store_path / "cache", progress=progress)
    records, read_failures = listing.records, listing.failures
    if any(r.frame is not None for r in records):  # Ray rows carry paths only: every frame would read frame 0
        raise ConfigError("--frames all is not supported with --engine ray yet; use --frames first or --engine local.")
    if config.limit is not None:
        records = records[: config.limit]
    model = describe_model(config.model_dir)
    failures: list[ReadFailure] = list(read_failures)
    plan: PoolPlan | None = None
    with StoreWriter(store_path, model_id=model.model_id, checkpoint_sha256=model.checkpoint_sha256,
                     preprocess_fingerprint=model.preprocessor.fingerprint(), dim=model.embed_dim,
                     index_kind=config.index, identity=listing.identity or None) as writer:
        todo = writer.pending(records)
        writer.record_failures(read_failures)
        embed_seconds = 0.0
        if todo:
            started = _connect(ray, address)
            try:
                plan = plan_pool(ray.cluster_resources(), config.device, gpus_per_worker, cpus_per_worker)
                check_precision(config.precision, torch.device(plan.device).type)  # here, not in every actor
                embed_start = time.perf_counter()  # actor start-up counts, joining the cluster does not
                failures += _embed(ray, _pipeline(ray, todo, model, plan, model.model_dir, config), todo, writer, config, progress)
                embed_seconds = time.perf_counter() - embed_start
            finally:
                if started:
                    ray.shutdown()
        store = writer.finalize()
    return summarize(store, source, model.model_id, plan.device if plan else "none", config.precision,
                     listed=len(records), pending=len(todo), writer=writer, failures=failures, start=start,
                     embed_seconds=embed_seconds, engine="ray",
                     notes=[f"ray: {plan.describe()}"] if plan else ["ray: nothing to embed, Ray not started"])


def _embed(ray: Any, ds: Any, todo: list[ImageRecord], writer: StoreWriter, config: IndexConfig,
           progress: bool) -> list[ReadFailure]:
    """Commit the pipeline's batches through ``writer`` in input order; returns this run's failures."""
    failures: list[ReadFailure] = []
    shards = ShardBuffer(writer, config.shard_size)
    with progress_bar(len(todo), "Embedding (Ray)", progress) as bar:
        for batch in _results(ray, ds, config.prefetch):
            ok = batch["stage"] == ""
            recs = [todo[int(i)] for i in batch["i"]]
            failed = [failure_for(r, str(s), str(why))
                      for r, s, why, good in zip(recs, batch["stage"], batch["reason"], ok, strict=True) if not good]
            shards.add([r for r, good in zip(recs, ok, strict=True) if good], np.asarray(batch["embedding"])[ok])
            writer.record_failures(failed)
            failures += failed
            bar.advance(len(recs))
    shards.flush()
    return failures
