"""The index job, defined once: list → pending → decode/preprocess → embed → write shards → finalize.

::

    list_source (reader; bad rows → failures)
      → StoreWriter.pending (skip what the store holds: this is what makes reruns resume)
      → engine.session(todo): decode + embed, batches in input order       ← the only engine-specific part
      → BackgroundWriter thread: device→host copy, non-finite check, StoreWriter.append every
        ``shard_size`` rows (one atomic shard commit), failures → errors.parquet
      → StoreWriter.finalize (build or grow the FAISS index) → IndexSummary

An engine (:class:`Engine`: ``cxr_embed.local_engine`` or ``cxr_embed.ray_engine``) only supplies how
the middle stages run. This module never imports an engine: :mod:`cxr_embed.job` picks one and hands
it over, so adding a distributor never touches the job.

Why a writer thread: on a GPU the forward of a batch takes about as long as copying its embeddings
back and committing a Parquet shard; doing both on the loop's thread would leave the GPU idle while
Parquet writes. The thread owns every StoreWriter call between ``pending`` and ``finalize`` (so the
writer's single-writer, crash-safe commits are unchanged), a bounded queue keeps memory flat, and an
error on the thread is re-raised in the job at the next batch.

Order is deterministic (engines keep input order; row_ids follow the listing), so a run killed at any
point and rerun ends with the same rows, row_ids and embeddings as one uninterrupted run.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cxr_embed.errors import ConfigError, InputError
from cxr_embed.indexes import resolve_kind
from cxr_embed.listing import Listing, accounting, failure_for, list_source
from cxr_embed.progress import Progress, progress_bar
from cxr_embed.records import ImageRecord, ReadFailure
from cxr_embed.store import CACHE_DIR, Store, StoreLock, StoreWriter, local_store_path

ENGINES = ("local", "ray")
WRITE_QUEUE_BATCHES = 2
"""Embedded batches waiting for the writer thread: enough to overlap one write with one forward."""


@dataclass
class IndexConfig:
    """Options of ``cxr-embed index`` (the CLI flags map 1:1)."""

    dataset: str = "auto"
    model_dir: str | Path | None = None
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 32
    workers: int | None = None  # None: a sensible number for the device (local_engine.default_workers)
    limit: int | None = None  # only the first N listed images (reruns with the same limit resume)
    shard_size: int = 4096  # rows per committed shard: the unit of crash-safety
    index: str | None = None  # flat|ivf|hnsw|ivfpq|auto; None keeps the store's choice (auto when new)
    engine: str = "local"
    prefetch: int = 4  # batches queued per worker
    ray_address: str | None = None  # --engine ray: None = $RAY_ADDRESS, else a new local instance
    gpus_per_worker: float | None = None  # --engine ray: GPUs per model actor (None: 1 when GPUs exist)
    cpus_per_worker: float = 1.0  # --engine ray: CPUs per decode task / actor
    prune: bool = False  # remove stored rows whose image is no longer in the source
    reader_options: dict[str, Any] = field(default_factory=dict)  # the reader's options (cli/reader_opts.py)
    link_file: Path | None = None  # DICOM: where reference -> file rows are written (outside the store)

    def check(self) -> None:
        """Refuse impossible values before any work (ConfigError naming the flag)."""
        for name in ("batch_size", "shard_size", "prefetch"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}."
                )
        if self.workers is not None and self.workers < 0:
            raise ConfigError(
                f"--workers must be 0 (decode in the main process) or more, got {self.workers}."
            )
        if self.limit is not None and self.limit < 0:
            raise ConfigError(f"--limit must be 0 or more, got {self.limit}.")
        if self.engine not in ENGINES:
            raise ConfigError(f"Unknown engine {self.engine!r}; use one of {', '.join(ENGINES)}.")
        if self.index is not None:
            resolve_kind(self.index, 0)
        ray_only = (
            self.ray_address is not None or self.gpus_per_worker is not None or self.cpus_per_worker != 1.0
        )
        if ray_only and self.engine != "ray":
            raise ConfigError(
                "--address, --gpus-per-worker and --cpus-per-worker only apply with --engine ray."
            )


@dataclass
class IndexSummary:
    """What one ``cxr-embed index`` run did (also printed as its final summary / JSON), for every engine."""

    store: str
    source: str
    model_id: str
    device: str
    precision: str
    listed: int  # inputs the reader saw (after --limit): listed = stored + failed + sum(skipped)
    already_stored: int  # skipped because a previous run stored them
    embedded: int  # new rows committed by this run
    failed: int  # inputs that failed in this run for a fault (unreadable, bad pixels, encode); exit code 2
    failures_by_stage: dict[str, int]  # every input errors.parquet got this run, faults and skips, by stage
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
    stored: int = 0  # listed inputs the store holds after the run (already_stored + embedded)
    skipped: dict[str, int] = field(default_factory=dict)  # decisions, not faults (out_of_scope, duplicate, …)
    balanced: bool = True  # listed == stored + failed + sum(skipped): False would mean an input went missing


@dataclass(frozen=True)
class ModelIdentity:
    """What the store is stamped with (and checks on resume): known before any image is embedded."""

    model_id: str
    checkpoint_sha256: str
    preprocess_fingerprint: str
    dim: int
    model_dir: str | Path | None = None  # recorded so later commands find the model again


@dataclass
class EmbeddedBatch:
    """One batch out of an engine, in input order.

    ``records``: the rows embedded; ``fetch_embeddings()``: their (len(records), D) float32 embeddings,
    called on the writer thread (a GPU engine finishes its asynchronous device→host copy there);
    ``failures``: inputs of this batch that could not be embedded.
    """

    records: list[ImageRecord]
    fetch_embeddings: Callable[[], np.ndarray]
    failures: list[ReadFailure] = field(default_factory=list)


class Engine(Protocol):
    """How the middle stages run (decode + embed); everything else is :func:`run_job`'s."""

    name: str
    identity: ModelIdentity
    precision: str

    def session(self, todo: list[ImageRecord]) -> AbstractContextManager[Iterator[EmbeddedBatch]]:
        """Start what the engine needs (workers, a cluster), yield its batches, stop it on exit.

        Every record of ``todo`` ends up in exactly one batch, embedded or failed, in input order.
        """
        ...

    def describe(self) -> tuple[str, list[str]]:
        """(device, notes) for the summary, once the session has run (or was skipped)."""
        ...


def run_job(
    engine: Engine, source: str | Path, store_dir: str | Path, config: IndexConfig, progress: bool = True,
    *, lock: StoreLock | None = None, start: float | None = None, listing: Listing | None = None,
) -> IndexSummary:
    """Embed every image under ``source`` that ``store_dir`` does not hold yet with ``engine``, then (re)index.

    ``lock``: the store's writer lock when the caller took it before loading the model (so a second
    writer is refused at once, not after a model load); ``start``: when the run began; ``listing``:
    the source's listing when the caller made it already (:func:`list_for_job`).
    """
    start = time.perf_counter() if start is None else start
    listing = listing or list_for_job(source, store_dir, config, progress)
    records = listing.records if config.limit is None else listing.records[: config.limit]
    with open_writer(store_dir, engine.identity, listing, config, lock) as writer:
        todo = writer.pending(records)
        writer.reconcile(records, prune=config.prune, complete=config.limit is None)
        writer.record_failures(listing.failures)
        embed_seconds = 0.0
        with engine.session(todo) as batches:
            embed_start = time.perf_counter()  # engine start-up (joining a cluster) excluded
            with (
                progress_bar(len(todo), f"Embedding ({engine.name})", progress) as bar,
                BackgroundWriter(writer, config.shard_size, engine.precision, bar) as sink,
            ):
                for batch in batches:
                    sink.put(batch)
            embed_seconds = time.perf_counter() - embed_start if todo else 0.0
        store = writer.finalize()
    device, notes = engine.describe()
    return summarize(
        store,
        source,
        engine.identity.model_id,
        device,
        engine.precision,
        listed=len({r.stored_path or r.path for r in records}) + len(listing.failures),
        already_stored=len(records) - len(todo),
        writer=writer,
        failures=listing.failures + sink.failures,
        start=start,
        embed_seconds=embed_seconds,
        engine=engine.name,
        notes=notes,
    )


def list_for_job(source: str | Path, store_dir: str | Path, config: IndexConfig, progress: bool) -> Listing:
    """The listing stage: the reader with the job's options, the store's listing cache and link file.

    Raises InputError when the source lists nothing at all (a wrong path or --dataset), before any
    store is written: an empty store would only hide the mistake.
    """
    listing = list_source(source, config.dataset, options=config.reader_options, link_file=config.link_file,
                          cache_dir=local_store_path(store_dir) / CACHE_DIR, progress=progress)
    if listing.listed == 0:
        raise InputError(nothing_found(source, config.dataset), str(source))
    return listing


def nothing_found(source: str | Path, dataset: str) -> str:
    """What an empty listing looked for, so the user can tell a wrong path from a wrong --dataset."""
    from cxr_embed.imageio import DICOM_SUFFIXES
    from cxr_embed.readers.folder import IMAGE_SUFFIXES

    looked = {
        "chestxray14": "a ChestX-ray14 Data_Entry CSV and its PNG images",
        "dicom": f"DICOM files ({', '.join(DICOM_SUFFIXES)} or DICM-tagged)",
        "folder": f"image files ({', '.join(IMAGE_SUFFIXES)})",
    }.get(dataset, f"a ChestX-ray14 CSV, DICOM files or image files ({', '.join(IMAGE_SUFFIXES)})")
    return (
        f"No images found in {source} (--dataset {dataset}): looked for {looked} in the folder and its "
        "subfolders. Check the path, or name the layout with --dataset."
    )


def open_writer(
    store_dir: str | Path, identity: ModelIdentity, listing: Listing, config: IndexConfig,
    lock: StoreLock | None = None,
) -> StoreWriter:
    """The store's one writer for this job: the single place the job creates it."""
    return StoreWriter(
        store_dir,
        model_id=identity.model_id,
        checkpoint_sha256=identity.checkpoint_sha256,
        preprocess_fingerprint=identity.preprocess_fingerprint,
        dim=identity.dim,
        index_kind=config.index,
        model_dir=identity.model_dir,
        lock=lock,
        identity=listing.identity or None,
    )


def summarize(
    store: Store,
    source: str | Path,
    model_id: str,
    device: str,
    precision: str,
    *,
    listed: int,
    already_stored: int,
    writer: StoreWriter,
    failures: list[ReadFailure],
    start: float,
    embed_seconds: float,
    engine: str,
    notes: list[str] | None = None,
) -> IndexSummary:
    """The final summary of one run, the same for every engine.

    ``listed``: inputs seen after --limit (:attr:`Listing.listed` without --limit); ``already_stored``:
    listed records a previous run stored; ``failures``: the listing's and the engine's. States
    ``listed = stored + failed + skipped(reason)`` (:func:`cxr_embed.listing.accounting`).
    """
    by_stage = dict(Counter(f.stage for f in failures))
    books = accounting(listed, already_stored + writer.rows_added, by_stage)
    return IndexSummary(
        store=str(store.path),
        source=str(source),
        model_id=model_id,
        device=device,
        precision=precision,
        listed=listed,
        already_stored=already_stored,
        embedded=writer.rows_added,
        failed=books["failed"],
        failures_by_stage=by_stage,
        rows=len(store),
        errors_in_store=store.errors().num_rows,
        index_kind=store.index_kind,
        seconds=round(time.perf_counter() - start, 3),
        embed_seconds=round(embed_seconds, 3),
        images_per_s=round(writer.rows_added / embed_seconds, 2)
        if writer.rows_added and embed_seconds > 0
        else 0.0,
        engine=engine,
        notes=[*(notes or []), *writer.repairs],
        updated=writer.reconciled.updated,
        missing_from_source=writer.reconciled.missing_from_source,
        pruned=writer.reconciled.pruned,
        stored=books["stored"],
        skipped=books["skipped"],
        balanced=books["balanced"],
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
            rest = emb[self.shard_size :]
            self.records, self.chunks = self.records[self.shard_size :], [rest] if len(rest) else []

    def flush(self) -> None:
        if self.records:
            self.writer.append(self.records, np.concatenate(self.chunks))
        self.records, self.chunks = [], []


_DONE = object()


class BackgroundWriter:
    """The write stage on its own thread: ``put`` embedded batches; they are committed in order.

    Between ``__enter__`` and ``__exit__`` this thread makes every ``StoreWriter`` call. A clean exit
    flushes the last partial shard and waits; an exit by exception writes what was already queued
    (so the committed rows do not depend on thread timing) but not the last partial shard (like a
    kill: committed shards stay, a rerun resumes). A failure on the thread (disk full, …) is raised
    from the next ``put`` or from ``__exit__``, never lost.
    """

    def __init__(
        self,
        writer: StoreWriter,
        shard_size: int,
        precision: str,
        bar: Progress,
        depth: int = WRITE_QUEUE_BATCHES,
    ):
        self.shards = ShardBuffer(writer, shard_size)
        self.writer = writer
        self.precision = precision
        self.bar = bar
        self.failures: list[ReadFailure] = []
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._abort = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cxr-embed-writer", daemon=True)

    def __enter__(self) -> BackgroundWriter:
        self._thread.start()
        return self

    def put(self, batch: EmbeddedBatch) -> None:
        """Queue ``batch`` (blocks while the queue is full); raises the writer thread's error if it died."""
        while True:
            self._raise_if_failed()
            try:
                self._queue.put(batch, timeout=0.1)
                return
            except queue.Full:
                continue

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self._abort.set()
            self._thread.join()
            return  # the job's own exception propagates
        while self._thread.is_alive():
            try:
                self._queue.put(_DONE, timeout=0.1)
                break
            except queue.Full:
                continue
        self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            while True:
                try:
                    item = self._queue.get(timeout=0.1)
                except queue.Empty:
                    if self._abort.is_set():  # the job failed: what it queued is written, the rest never comes
                        return
                    continue
                if item is _DONE:
                    self.shards.flush()
                    return
                self._write(item)
        except BaseException as exc:  # handed to the job's thread, which raises it
            self._error = exc

    def _write(self, batch: EmbeddedBatch) -> None:
        failures = list(batch.failures)
        if batch.records:
            emb = batch.fetch_embeddings()
            finite = np.isfinite(emb).all(axis=1)
            failures += [
                failure_for(r, "encode", f"non-finite embedding at {self.precision}; retry with --precision fp32")
                for r, ok in zip(batch.records, finite, strict=True)
                if not ok
            ]
            self.shards.add([r for r, ok in zip(batch.records, finite, strict=True) if ok], emb[finite])
        self.writer.record_failures(failures)
        self.failures += failures
        self.bar.advance(len(batch.records) + len(batch.failures))
