"""The job pipeline's own stages (listing → resume → background writer → finalize) with a stand-in engine.

The engine here yields fixed vectors instead of running a model, so each test can make the write
stage fail at a chosen batch; the listing, StoreWriter, Parquet and FAISS are the real ones.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from cxr_embed.errors import StoreError
from cxr_embed.pipeline import EmbeddedBatch, IndexConfig, ModelIdentity, run_job
from cxr_embed.records import ImageRecord
from cxr_embed.store import Store, validate_store

DIM = 4
IDENTITY = ModelIdentity("pipeline-test-model", "0" * 64, "pipeline-test-fingerprint", DIM)


def vectors(records: list[ImageRecord]) -> np.ndarray:
    """A fixed unit vector per image_id (stable across runs, so resumes can be compared)."""
    out = np.stack([np.random.default_rng(zlib.crc32(r.image_id.encode())).normal(size=DIM) for r in records])
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


class ArrayEngine:
    """Batches of ``batch`` records; ``fetch(k, records)`` gives batch k's embeddings (may raise, or be bad)."""

    name = "test"
    precision = "fp32"
    identity = IDENTITY

    def __init__(
        self,
        batch: int = 2,
        fetch: Callable[[int, list[ImageRecord]], np.ndarray] | None = None,
        fail_after: int | None = None,
    ):
        self.batch, self.fetch, self.fail_after = batch, fetch or (lambda k, recs: vectors(recs)), fail_after
        self.produced = 0

    @contextmanager
    def session(self, todo: list[ImageRecord]) -> Iterator[Iterator[EmbeddedBatch]]:
        yield self._batches(todo)

    def _batches(self, todo: list[ImageRecord]) -> Iterator[EmbeddedBatch]:
        for k, start in enumerate(range(0, len(todo), self.batch)):
            if self.fail_after is not None and k == self.fail_after:
                raise RuntimeError("engine lost its device")
            recs = todo[start : start + self.batch]
            self.produced += 1
            yield EmbeddedBatch(recs, lambda k=k, recs=recs: self.fetch(k, recs))

    def describe(self) -> tuple[str, list[str]]:
        return "cpu", []


def run(engine: ArrayEngine, source: Path, store: Path, **config) -> object:
    return run_job(engine, source, store, IndexConfig(**{"shard_size": 2, **config}), progress=False)


def test_all_rows_committed_in_listing_order_with_one_summary(synth_cxr14: Path, tmp_path: Path) -> None:
    summary = run(ArrayEngine(batch=3), synth_cxr14, tmp_path / "s", limit=7, shard_size=4)
    assert (summary.engine, summary.listed, summary.embedded, summary.rows, summary.failed) == (
        "test",
        7,
        7,
        7,
        0,
    )
    store = Store.open(tmp_path / "s")
    records = store.metadata(["image_id"]).column("image_id").to_pylist()
    assert [s["rows"] for s in store.manifest["shards"]] == [4, 3]
    np.testing.assert_array_equal(store.embeddings(), vectors([_rec(i) for i in records]))
    assert validate_store(store.path).ok


def _rec(image_id: str) -> ImageRecord:
    return ImageRecord(
        image_id=image_id,
        path="",
        patient_id=None,
        study=None,
        split=None,
        label=None,
        findings=None,
        sex=None,
        age=None,
        view=None,
        source="",
    )


def test_non_finite_embeddings_become_encode_failures_and_the_run_continues(
    synth_cxr14: Path, tmp_path: Path
) -> None:
    def fetch(k: int, recs: list[ImageRecord]) -> np.ndarray:
        emb = vectors(recs)
        if k == 1:
            emb[0] = np.nan  # what an fp16 overflow looks like
        return emb

    summary = run(ArrayEngine(fetch=fetch), synth_cxr14, tmp_path / "s", limit=6)
    assert (summary.embedded, summary.failures_by_stage, summary.rows) == (5, {"encode": 1}, 5)
    errors = Store.open(tmp_path / "s").errors().to_pylist()
    assert [e["stage"] for e in errors] == ["encode"] and "non-finite embedding at fp32" in errors[0][
        "reason"
    ]


def test_a_write_error_on_the_writer_thread_stops_the_job_and_committed_shards_stay(
    synth_cxr14: Path, tmp_path: Path
) -> None:
    def fetch(k: int, recs: list[ImageRecord]) -> np.ndarray:
        return (
            np.ones((len(recs), DIM + 1), np.float32) if k == 2 else vectors(recs)
        )  # wrong width at batch 2

    with pytest.raises(StoreError, match="embeddings of shape"):
        run(ArrayEngine(fetch=fetch), synth_cxr14, tmp_path / "s", limit=10)
    assert len(Store.open(tmp_path / "s", check_index=False)) == 4  # batches 0 and 1: two committed shards

    resumed = run(ArrayEngine(), synth_cxr14, tmp_path / "s", limit=10)
    assert (resumed.already_stored, resumed.embedded, resumed.rows) == (4, 6, 10)
    assert validate_store(tmp_path / "s").ok


def test_a_failed_device_copy_is_raised_even_while_the_job_waits_on_a_full_queue(
    synth_cxr14: Path, tmp_path: Path
) -> None:
    def fetch(k: int, recs: list[ImageRecord]) -> np.ndarray:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    engine = ArrayEngine(batch=1, fetch=fetch)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run(engine, synth_cxr14, tmp_path / "s", limit=40)
    assert engine.produced < 10  # the job stopped pulling batches soon after the writer died
    assert len(Store.open(tmp_path / "s", check_index=False)) == 0


def test_an_engine_error_stops_the_writer_without_committing_a_partial_shard(
    synth_cxr14: Path, tmp_path: Path
) -> None:
    with pytest.raises(RuntimeError, match="engine lost its device"):
        run(ArrayEngine(batch=2, fail_after=3), synth_cxr14, tmp_path / "s", limit=12, shard_size=4)
    store = Store.open(tmp_path / "s", check_index=False)
    assert len(store) == 4  # 6 rows embedded: one full shard committed, the 2 buffered rows were not
