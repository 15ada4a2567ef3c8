"""The index job on real synthetic X-rays with the real tiny model: parity, failures, resume, refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_embed import indexes
from cxr_embed.errors import ConfigError, StoreLockedError, StoreMismatchError
from cxr_embed.job import IndexConfig, run_index
from cxr_embed.readers import read_dataset
from cxr_embed.store import Store, StoreWriter, validate_store

CPU = {"device": "cpu", "batch_size": 4}
REFERENCE = Path(__file__).parent / "data" / "reference"


def todays_preprocessing(path: str) -> torch.Tensor:
    """The float32 path every store so far was made with (per image, in the worker): kept as the yardstick."""
    arr = np.asarray(Image.open(path).convert("L").resize((480, 480), Image.Resampling.BICUBIC), dtype=np.uint8)
    x = torch.from_numpy(np.ascontiguousarray(np.repeat(arr[None], 3, axis=0))).float().div(255)
    return x.sub_(torch.tensor([0.485, 0.456, 0.406])[:, None, None]).div_(torch.tensor([0.229, 0.224, 0.225])[:, None, None])


def test_job_embeddings_are_bitwise_those_of_the_float32_worker_path(synth_cxr14: Path, tiny_model, tmp_path: Path) -> None:
    """uint8 from the workers + normalisation on the model's device changes no bit of a CPU embedding."""
    summary = run_index(synth_cxr14, tmp_path / "s", IndexConfig(**CPU, workers=1, limit=8), progress=False,
                        model=tiny_model)
    assert summary.embedded == 8
    paths = [r.path for r in read_dataset(synth_cxr14)[:8]]
    old = np.concatenate([tiny_model.encode_images(torch.stack([todays_preprocessing(p) for p in paths[i : i + 4]]))
                          .numpy() for i in range(0, 8, 4)])
    assert np.array_equal(Store.open(tmp_path / "s").embeddings(), old)


def test_device_normalisation_reproduces_the_reference_embeddings_bitwise(tiny_model, reference_batch) -> None:
    levels = torch.from_numpy(np.load(REFERENCE / "preprocessed_uint8.npz")["levels"])
    new = tiny_model.encode_images(tiny_model.preprocessor.normalize(levels)).numpy()
    assert np.array_equal(new, tiny_model.encode_images(reference_batch).numpy())
    np.testing.assert_allclose(new, np.load(REFERENCE / "image_embeddings.npy"), atol=1e-5, rtol=0)


def test_tiny_store_holds_the_models_embeddings_of_every_image(tiny_store: Store, tiny_model, synth_cxr14: Path) -> None:
    records = read_dataset(synth_cxr14)
    meta = tiny_store.metadata()
    assert meta.column("image_id").to_pylist() == [r.image_id for r in records]
    assert meta.column("label").to_pylist() == [r.label for r in records]
    assert set(meta.column("model_id").to_pylist()) == {tiny_model.model_id}
    assert tiny_store.preprocess_fingerprint == tiny_model.preprocessor.fingerprint()
    rows = np.arange(0, 40, 5)  # 8 images spread over all three shards
    expected = tiny_model.embed_paths([records[i].path for i in rows])
    np.testing.assert_allclose(tiny_store.embeddings()[rows], expected, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(indexes.index_ids(tiny_store.index()), np.arange(40))
    assert [s["rows"] for s in tiny_store.manifest["shards"]] == [16, 16, 8]
    assert validate_store(tiny_store.path).ok


def test_corrupt_and_missing_images_become_error_rows_and_reruns_append(
    synth_cxr14: Path, tiny_store: Store, tiny_model, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    shutil.copytree(synth_cxr14, src)
    records = read_dataset(src)
    missing, corrupt = Path(records[1].path), Path(records[3].path)
    original = corrupt.read_bytes()
    missing.unlink()
    corrupt.write_bytes(original[: len(original) // 3])  # truncated PNG: fails inside a worker process
    store_dir = tmp_path / "store"
    config = IndexConfig(**CPU, workers=1, limit=4)

    first = run_index(src, store_dir, config, progress=False, model=tiny_model)
    # listed = 4 records (--limit) + the missing file the listing reported = stored 3 + failed 2
    assert (first.listed, first.stored, first.embedded, first.failed, first.rows) == (5, 3, 3, 2, 3)
    assert first.failures_by_stage == {"missing": 1, "decode": 1} and first.balanced and first.skipped == {}
    errors = Store.open(store_dir).errors().to_pylist()
    assert {(e["image_id"], e["stage"]) for e in errors} == {(missing.name, "missing"), (corrupt.name, "decode")}
    assert str(corrupt) in next(e["reason"] for e in errors if e["stage"] == "decode")

    # same embeddings as the tiny store for the same images: identical pipeline, any store
    store = Store.open(store_dir)
    ids = store.metadata(["image_id"]).column("image_id").to_pylist()
    reference = tiny_store.metadata(["image_id"]).column("image_id").to_pylist()
    np.testing.assert_allclose(store.embeddings(), tiny_store.embeddings()[[reference.index(i) for i in ids]], atol=1e-6)

    corrupt.write_bytes(original)  # the user fixes the file and lists one more image
    second = run_index(src, store_dir, IndexConfig(**CPU, workers=0, limit=5), progress=False, model=tiny_model)
    assert (second.already_stored, second.embedded, second.rows) == (3, 2, 5)
    store = Store.open(store_dir)
    assert store.index().ntotal == 5
    assert store.errors().column("stage").to_pylist() == ["missing"]  # the fixed file's error is gone
    assert validate_store(store_dir).ok


def test_a_store_made_with_another_model_is_refused(synthetic_store: Store, synth_cxr14: Path, tiny_model, tmp_path: Path) -> None:
    dst = tmp_path / "store"
    shutil.copytree(synthetic_store.path, dst)
    with pytest.raises(StoreMismatchError, match="different model or preprocessing"):
        run_index(synth_cxr14, dst, IndexConfig(**CPU, workers=0), progress=False, model=tiny_model)
    assert len(Store.open(dst)) == 600


def test_a_second_concurrent_writer_is_refused(synth_cxr14: Path, tiny_model, tmp_path: Path) -> None:
    identity = {"model_id": tiny_model.model_id, "checkpoint_sha256": tiny_model.checkpoint_sha256,
                "preprocess_fingerprint": tiny_model.preprocessor.fingerprint(), "dim": tiny_model.embed_dim}
    with StoreWriter(tmp_path / "store", **identity):
        with pytest.raises(StoreLockedError, match="being written by another process"):
            run_index(synth_cxr14, tmp_path / "store", IndexConfig(**CPU, workers=0), progress=False, model=tiny_model)


def test_bad_options_are_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--batch-size"):
        run_index(tmp_path, tmp_path / "s", IndexConfig(batch_size=0), progress=False)
    with pytest.raises(ConfigError, match="Unknown engine"):
        run_index(tmp_path, tmp_path / "s", IndexConfig(engine="spark"), progress=False)
    with pytest.raises(ConfigError, match="Unknown index kind 'lsh'"):
        run_index(tmp_path, tmp_path / "s", IndexConfig(index="lsh"), progress=False)
    assert not (tmp_path / "s").exists()

