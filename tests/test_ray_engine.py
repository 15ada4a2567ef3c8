"""The Ray engine against a real local Ray instance (2 CPUs), the tiny model and synthetic ChestX-ray14.

Ray's start-up dominates the cost, so one instance serves the whole module and each test runs the
pipeline once or twice on a few dozen 256² images.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from cxr_embed.errors import ConfigError, DependencyError
from cxr_embed.job import IndexConfig, run_index
from cxr_embed.model import tiny_model_dir
from cxr_embed.ray_engine import local_store_path, plan_pool, run_index_ray
from cxr_embed.records import read_dataset
from cxr_embed.store import Store

@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance with 2 CPUs, no dashboard, a small object store; shut down after the module."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=100 * 2**20,
             log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _config(**overrides) -> IndexConfig:
    """Same decode/batch/shard settings as the ``tiny_store`` fixture, so shards line up 1:1."""
    return IndexConfig(**{"model_dir": tiny_model_dir(), "device": "cpu", "batch_size": 8, "shard_size": 16,
                          "engine": "ray", **overrides})


def _assert_same_rows(store: Store, reference: Store) -> None:
    """Same image_ids in the same row order, same metadata and identity, embeddings within 1e-6."""
    assert store.metadata().equals(reference.metadata())
    np.testing.assert_allclose(store.embeddings(), reference.embeddings(), rtol=0, atol=1e-6)
    assert len(set(store.metadata(["image_id"]).column("image_id").to_pylist())) == len(store)


@pytest.mark.slow
def test_ray_store_equals_local_engine(ray_local, synth_cxr14: Path, tiny_store: Store, tmp_path: Path) -> None:
    summary = run_index(synth_cxr14, tmp_path / "store", _config(), progress=False)  # dispatched by job.py
    store = Store.open(tmp_path / "store")  # checks FAISS ids == row_ids
    assert (summary.engine, summary.embedded, summary.failed, summary.rows) == ("ray", 40, 0, 40)
    assert summary.notes == ["ray: 1 model actor(s) on cpu, 1 CPU each"]
    _assert_same_rows(store, tiny_store)
    assert [s["rows"] for s in store.manifest["shards"]] == [s["rows"] for s in tiny_store.manifest["shards"]]
    assert store.index_kind == tiny_store.index_kind == "flat"
    assert store.errors().num_rows == 0


@pytest.mark.slow
def test_rerun_after_interrupted_run_completes_without_duplicates(ray_local, synth_cxr14: Path, tiny_store: Store,
                                                                  tmp_path: Path) -> None:
    path = tmp_path / "store"
    first = run_index_ray(synth_cxr14, path, _config(limit=13), progress=False)  # the "interrupted" run
    assert (first.embedded, len(Store.open(path))) == (13, 13)
    second = run_index_ray(synth_cxr14, path, _config(), progress=False)
    assert (second.already_stored, second.embedded, second.rows) == (13, 27, 40)
    _assert_same_rows(Store.open(path), tiny_store)
    third = run_index_ray(synth_cxr14, path, _config(), progress=False)
    assert (third.embedded, third.rows, third.notes) == (0, 40, ["ray: nothing to embed, Ray not started"])


@pytest.mark.slow
def test_local_run_resumed_by_ray_engine(ray_local, synth_cxr14: Path, tiny_store: Store, tiny_model,
                                         tmp_path: Path) -> None:
    """Same store format and resume semantics: a store a local run started is finished by Ray."""
    path = tmp_path / "store"
    run_index(synth_cxr14, path, _config(engine="local", workers=0, limit=20), progress=False, model=tiny_model)
    summary = run_index_ray(synth_cxr14, path, _config(), progress=False)
    assert (summary.already_stored, summary.embedded) == (20, 20)
    _assert_same_rows(Store.open(path), tiny_store)


@pytest.mark.slow
def test_decode_failures_become_error_rows(ray_local, synth_cxr14: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(synth_cxr14, src)
    broken = read_dataset(src)[2]
    Path(broken.path).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    summary = run_index_ray(src, tmp_path / "store", _config(limit=8), progress=False)
    store = Store.open(tmp_path / "store")
    assert (summary.embedded, summary.failures_by_stage, len(store)) == (7, {"decode": 1}, 7)
    errors = store.errors().to_pylist()
    assert [(e["image_id"], e["stage"]) for e in errors] == [(broken.image_id, "decode")]
    assert broken.image_id not in store.metadata(["image_id"]).column("image_id").to_pylist()


def test_without_ray_the_engine_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` sees when the extra is not installed
    with pytest.raises(DependencyError, match=r"pip install 'cxr-embed\[ray\]'"):
        run_index_ray(tmp_path, tmp_path / "store", _config())


@pytest.mark.parametrize(
    ("resources", "device", "gpus", "cpus", "expected"),
    [
        ({"CPU": 64, "GPU": 8}, "auto", None, 1, (8, "cuda", 1.0)),
        ({"CPU": 64, "GPU": 8}, "auto", 0.5, 1, (16, "cuda", 0.5)),
        ({"CPU": 64, "GPU": 8}, "cpu", None, 4, (4, "cpu", 0.0)),
        ({"CPU": 2}, "auto", None, 1, (1, "cpu", 0.0)),
        ({"CPU": 16}, "auto", None, 1, (4, "cpu", 0.0)),
    ],
)
def test_plan_pool_sizes_the_actor_pool(resources, device, gpus, cpus, expected) -> None:
    plan = plan_pool(resources, device, gpus, cpus)
    assert (plan.actors, plan.device, plan.gpus_per_worker) == expected


@pytest.mark.parametrize(
    ("resources", "device", "gpus", "cpus", "message"),
    [
        ({"CPU": 8}, "cuda", None, 1, "has 0 GPU"),
        ({"CPU": 8, "GPU": 1}, "auto", 2, 1, "asks for 2"),
        ({"CPU": 2}, "cpu", None, 2, "leaves no CPU for decoding"),
    ],
)
def test_plan_pool_refuses_what_the_cluster_cannot_run(resources, device, gpus, cpus, message) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_pool(resources, device, gpus, cpus)


def test_store_uris() -> None:
    assert local_store_path("file:///data/stores/cxr14") == Path("/data/stores/cxr14")
    with pytest.raises(ConfigError, match="POSIX filesystem"):
        local_store_path("s3://bucket/stores/cxr14")
