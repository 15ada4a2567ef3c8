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

from cxr_embed.errors import ConfigError, DependencyError, ModelNotFoundError
from cxr_embed.job import IndexConfig, run_index
from cxr_embed.model import tiny_model_dir
from cxr_embed.ray_engine import plan_pool, remote_error, run_index_ray
from cxr_embed.readers import read_dataset
from cxr_embed.store import Store, local_store_path


@pytest.fixture(scope="module")
def ray_local():
    """A new local Ray instance (never a cluster already running here) with 2 CPUs, no dashboard and a small
    object store; shut down after the module."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=100 * 2**20,
             log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _config(**overrides) -> IndexConfig:
    """Same decode/batch/shard settings as the ``tiny_store`` fixture, so shards line up 1:1."""
    return IndexConfig(**{"model_dir": tiny_model_dir(), "device": "cpu", "batch_size": 8, "shard_size": 16,
                          "engine": "ray", **overrides})


def _by_image_id(store: Store) -> tuple[list[dict], np.ndarray]:
    """Metadata rows (row_id dropped) and embeddings, both sorted by image_id."""
    meta = store.metadata().drop_columns(["row_id"]).to_pylist()
    order = sorted(range(len(meta)), key=lambda r: meta[r]["image_id"])
    return [meta[r] for r in order], store.embeddings()[order]


@pytest.mark.slow
def test_interrupted_run_with_a_bad_file_resumes_to_the_local_engines_store(ray_local, synth_cxr14: Path, tiny_model,
                                                                            tiny_store: Store, tmp_path: Path) -> None:
    """Run 1 (``--limit 13``, "interrupted") meets a corrupt PNG: an errors.parquet row (stage "decode"),
    not a crash. The file is then fixed and the full command rerun: it embeds only what is missing,
    the stale error row goes, and the store equals the single-process engine's (``tiny_store``)
    row for row by image_id, embeddings bitwise. Both engines then agree nothing is left to do.
    """
    src = tmp_path / "src"
    shutil.copytree(synth_cxr14, src)
    broken = read_dataset(src)[3]
    good_bytes = Path(broken.path).read_bytes()
    Path(broken.path).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    path = tmp_path / "store"

    first = run_index(src, path, _config(limit=13), progress=False)  # dispatched to the Ray engine by job.py
    assert (first.engine, first.embedded, first.failures_by_stage) == ("ray", 12, {"decode": 1})
    assert first.notes == ["ray: 1 model actor(s) on cpu, 1 CPU each"]
    store = Store.open(path)
    assert [(e["image_id"], e["stage"]) for e in store.errors().to_pylist()] == [(broken.image_id, "decode")]
    expected_ids = tiny_store.metadata(["image_id"]).column("image_id").to_pylist()
    assert store.metadata(["image_id"]).column("image_id").to_pylist() == [i for i in expected_ids[:13] if i != broken.image_id]

    Path(broken.path).write_bytes(good_bytes)
    second = run_index_ray(src, path, _config(), progress=False)
    assert (second.already_stored, second.embedded, second.failed, second.rows) == (12, 28, 0, 40)
    store = Store.open(path)  # also checks FAISS ids == row_ids
    assert store.errors().num_rows == 0
    meta, emb = _by_image_id(store)
    ref_meta, ref_emb = _by_image_id(tiny_store)
    assert meta == [{**row, "path": row["path"].replace(str(synth_cxr14), str(src))} for row in ref_meta]
    assert np.array_equal(emb, ref_emb)  # same decode (cxr_embed.decode), same normalisation, same batches
    assert store.index_kind == tiny_store.index_kind == "flat"

    again = run_index_ray(src, path, _config(), progress=False)
    assert (again.embedded, again.rows, again.notes) == (0, 40, ["ray: nothing to embed, Ray not started"])
    local = run_index(src, path, _config(engine="local", workers=0), progress=False, model=tiny_model)
    assert (local.already_stored, local.embedded, local.rows) == (40, 0, 40)


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


def test_remote_errors_come_back_as_the_workers_cxr_embed_error() -> None:
    """Ray forwards only the traceback text of a failed actor/UDF; the user sees the original error."""
    ray_text = (
        "The actor died because of an error raised in its creation task, \x1b[36mray::MapWorker(...).__init__()\x1b[39m\n"
        "Traceback (most recent call last):\n  File \"cxr_embed/model/files.py\", line 70, in resolve_model_dir\n"
        "cxr_embed.errors.ModelNotFoundError: /models/mii (from --model-dir) is not a MedImageInsight model folder.\n"
    )
    error = remote_error(RuntimeError(ray_text))
    assert isinstance(error, ModelNotFoundError)
    assert str(error) == "/models/mii (from --model-dir) is not a MedImageInsight model folder."
    assert remote_error(RuntimeError("raylet died: out of memory")) is None


def test_ray_only_flags_are_refused_with_the_local_engine(tmp_path: Path) -> None:
    from cxr_embed_cli.main import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["index", str(tmp_path), "--store", str(tmp_path / "s"), "--gpus-per-worker", "1"])
    assert result.exit_code == 1
    assert "only apply with --engine ray" in result.output
    config = IndexConfig(engine="ray", ray_address="auto", gpus_per_worker=0.5, cpus_per_worker=2)
    config.check()  # accepted with the Ray engine
