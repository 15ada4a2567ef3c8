"""The Ray engine of ``cxr-embed index --engine ray``: the same job, its middle stages on a Ray cluster.

Supplies only decode + embed to :func:`cxr_embed.pipeline.run_job` (listing, resume, shard writing,
failures and the FAISS index are the pipeline's, identical to the local engine's)::

    Ray Data: from_items(index, path) in input order
      → map_batches(decode_batch)   CPU tasks: cxr_embed.decode per image → uint8 pixels; failures
                                    become (stage, reason) columns, never exceptions
      → map_batches(EmbedActor)     an actor pool, one loaded model per actor (one per GPU, or a
                                    small pool of CPU actors without GPUs); normalises on its device
    → driver: iter_batches (order preserved) → the pipeline's writer thread

Why the driver writes: :class:`~cxr_embed.store.StoreWriter` (lock, dense row_ids, atomic manifest,
errors.parquet) is the store's single writer, so committing from one process keeps the Ray store
byte-for-byte the same format, with the same row order and resume semantics, as the local engine's.
Only embeddings (D float32 per image) travel back to the driver, so it is never the bottleneck: at
1024 dims that is 4 KiB per image, a few MB/s even at thousands of images/s.

Ray fuses the decode tasks into the embedding actors when both ask for the same resources (a CPU-only
pool with ``cpus_per_worker=1``); that is right there: a CPU forward costs ~1000x the decode, and
fusion saves shipping pixels through the object store. On GPUs the actors ask for a GPU, so decoding
stays on separate CPU tasks that keep the GPUs fed, and ships uint8 (675 KiB per 480² image).
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxr_embed import errors
from cxr_embed.decode import decode_image
from cxr_embed.errors import ConfigError, CxrEmbedError, DependencyError, StoreMismatchError
from cxr_embed.listing import failure_for
from cxr_embed.pipeline import EmbeddedBatch, IndexConfig, IndexSummary, ModelIdentity, run_job
from cxr_embed.records import ImageRecord, ReadFailure

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


def plan_pool(
    resources: dict[str, float], device: str, gpus_per_worker: float | None, cpus_per_worker: float
) -> PoolPlan:
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
        raise ConfigError(
            f"--device {device} conflicts with --gpus-per-worker 0; use --device cpu or give each actor a GPU."
        )
    if cpus_per_worker > max(1.0, cpus - 1):
        raise ConfigError(
            f"--cpus-per-worker {cpus_per_worker:g} leaves no CPU for decoding on a Ray cluster with {cpus:g} CPU(s); "
            f"use at most {max(1.0, cpus - 1):g}."
        )
    actors = max(1, min(CPU_POOL_MAX, int((cpus - 1) // cpus_per_worker)))
    return PoolPlan(actors, "cpu", 0.0, cpus_per_worker)


# ----------------------------------------------------------------------------- stages (run on Ray workers)


def decode_batch(batch: dict[str, np.ndarray], preprocessor: Preprocessor) -> dict[str, np.ndarray]:
    """Stage 1 (CPU tasks): paths → uint8 resized pixels; a bad file fills ``stage``/``reason`` instead.

    Returns columns ``i``, ``pixels`` (B, 3, S, S) uint8 (zeros for failed rows), ``stage`` ("" when
    the image decoded) and ``reason``. Uses :func:`cxr_embed.decode.decode_image`, so every engine
    decodes and classifies failures identically.
    """
    n, size = len(batch["path"]), preprocessor.image_size
    pixels = np.zeros((n, 3, size, size), dtype=np.uint8)
    stage, reason = np.full(n, "", dtype=object), np.full(n, "", dtype=object)
    for k, (path, frame) in enumerate(zip(batch["path"], batch["frame"], strict=True)):
        item = decode_image(str(path), preprocessor, frame=None if int(frame) < 0 else int(frame))
        if isinstance(item, ReadFailure):
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
        """Columns ``i``, ``embedding`` (B, D) float32 (zeros for failed rows), ``stage``, ``reason``."""
        import torch

        ok = batch["stage"] == ""
        emb = np.zeros((len(ok), self.model.embed_dim), dtype=np.float32)
        if ok.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            if self.model.device.type == "cuda":
                pixels = pixels.pin_memory()
            with torch.inference_mode():
                x = self.model.preprocessor.normalize(pixels.to(self.model.device, non_blocking=True))
                emb[ok] = self.model.encode_images(x).numpy()
        return {"i": batch["i"], "embedding": emb, "stage": batch["stage"], "reason": batch["reason"]}


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


def _pipeline(
    ray: Any, todo: list[ImageRecord], model: MedImageInsight, plan: PoolPlan, config: IndexConfig
) -> Any:
    """The Ray Data plan: input order preserved, so row_ids match the local engine's exactly."""
    rows = [{"i": i, "path": rec.path, "frame": -1 if rec.frame is None else rec.frame} for i, rec in enumerate(todo)]
    ds = ray.data.from_items(
        rows, override_num_blocks=min(MAX_BLOCKS, math.ceil(len(rows) / config.batch_size))
    )
    ds = ds.map_batches(
        decode_batch,
        batch_size=config.batch_size,
        batch_format="numpy",
        fn_kwargs={"preprocessor": model.preprocessor},
        concurrency=config.workers or None,
    )
    ds = ds.map_batches(
        EmbedActor,
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_gpus=plan.gpus_per_worker or None,
        num_cpus=plan.cpus_per_worker,
        fn_constructor_kwargs={
            "model_dir": str(model.model_dir.resolve()),
            "device": plan.device,
            "precision": config.precision,
            "identity": _identity(model),
        },
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


class RayEngine:
    """Decode tasks + a model actor pool on a Ray cluster; the driver holds only the model's identity.

    ``config.ray_address`` is ``None`` (``$RAY_ADDRESS``, else a new local instance), ``"auto"`` (the
    cluster running on this machine), ``"host:6379"`` or ``"ray://host:10001"``; a Ray already
    initialised in this process is reused. The driver reads the listing and the model identity, so it
    needs the source listing and the model folder; every worker needs the image files and the model
    folder at the same paths. ``config.workers`` caps concurrent decode tasks (default: Ray decides);
    ``config.prefetch`` is the number of result batches the driver prefetches. A session with nothing
    to embed does not start Ray at all.
    """

    name = "ray"

    def __init__(self, config: IndexConfig):
        self.ray = _import_ray()
        self.config = config
        self.model = describe_model(config.model_dir)
        self.identity = ModelIdentity(*_identity(self.model), self.model.embed_dim, self.model.model_dir)
        self.precision = config.precision
        self.plan: PoolPlan | None = None

    @contextmanager
    def session(self, todo: list[ImageRecord]) -> Iterator[Iterator[EmbeddedBatch]]:
        if not todo:
            yield iter(())
            return
        import torch

        from cxr_embed.precision import check_precision

        config, ray = self.config, self.ray
        started = _connect(ray, config.ray_address)
        try:
            self.plan = plan_pool(
                ray.cluster_resources(), config.device, config.gpus_per_worker, config.cpus_per_worker
            )
            check_precision(config.precision, torch.device(self.plan.device).type)  # here, not in every actor
            yield self._batches(_pipeline(ray, todo, self.model, self.plan, config), todo)
        finally:
            if started:
                ray.shutdown()

    def describe(self) -> tuple[str, list[str]]:
        if self.plan is None:
            return "none", ["ray: nothing to embed, Ray not started"]
        return self.plan.device, [f"ray: {self.plan.describe()}"]

    def _batches(self, ds: Any, todo: list[ImageRecord]) -> Iterator[EmbeddedBatch]:
        for batch in _results(self.ray, ds, self.config.prefetch):
            ok = batch["stage"] == ""
            recs = [todo[int(i)] for i in batch["i"]]
            failed = [
                failure_for(r, str(s), str(why))
                for r, s, why, good in zip(recs, batch["stage"], batch["reason"], ok, strict=True)
                if not good
            ]
            emb = np.asarray(batch["embedding"])[ok]
            yield EmbeddedBatch(
                [r for r, good in zip(recs, ok, strict=True) if good], lambda emb=emb: emb, failed
            )


def run_index_ray(
    source: str | Path, store_dir: str | Path, config: IndexConfig | None = None, *, progress: bool = True
) -> IndexSummary:
    """:func:`cxr_embed.job.run_index` with the Ray engine (same inputs, store and resume semantics)."""
    config = config or IndexConfig(engine="ray")
    config.check()
    return run_job(RayEngine(config), source, store_dir, config, progress)
