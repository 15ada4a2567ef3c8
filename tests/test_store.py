"""The store format and its Python API, on real Parquet, FAISS and DuckDB (no model needed)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest
from conftest import make_synthetic_store_arrays

from cxr_embed import indexes
from cxr_embed.errors import StoreError, StoreLockedError, StoreMismatchError
from cxr_embed.records import FINDINGS, ReadFailure
from cxr_embed.store import (
    MANIFEST,
    Store,
    StoreWriter,
    build_store_from_arrays,
    store_info,
    validate_store,
)

IDENTITY = {"model_id": "synthetic", "checkpoint_sha256": "0" * 64, "preprocess_fingerprint": "synthetic"}


@pytest.fixture
def store_copy(synthetic_store: Store, tmp_path: Path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(synthetic_store.path, dst)
    return dst


def _rows(n: int, prefix: str = "img") -> list[dict]:
    return [{"image_id": f"{prefix}{i:04d}", "patient_id": f"p{i // 2}", "label": i % 2} for i in range(n)]


def test_synthetic_store_reads_back_exactly(synthetic_store: Store) -> None:
    emb, rows = make_synthetic_store_arrays()
    got = synthetic_store.embeddings()
    assert len(synthetic_store) == 600 and synthetic_store.dim == 64
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, emb)
    meta = synthetic_store.metadata()
    assert "embedding" not in meta.column_names
    assert meta.column("row_id").to_pylist() == list(range(600))
    assert meta.column("image_id").to_pylist() == [r["image_id"] for r in rows]
    assert meta.schema.field("label").type == pa.int8() and meta.schema.field("study").type == pa.int32()
    flags = np.stack([meta.column(f).to_numpy() for f in FINDINGS], axis=1)
    np.testing.assert_array_equal(flags, [r["findings"] for r in rows])
    assert synthetic_store.metadata(["patient_id"]).column_names == ["patient_id"]
    assert [s["rows"] for s in synthetic_store.manifest["shards"]] == [512, 88]


def test_index_ids_are_row_ids_and_search_works(synthetic_store: Store) -> None:
    index = synthetic_store.index()
    np.testing.assert_array_equal(indexes.index_ids(index), np.arange(600))
    emb = synthetic_store.embeddings()
    scores, hits = index.search(emb[[7, 300]], 1)
    np.testing.assert_array_equal(hits[:, 0], [7, 300])
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def _replace_index(store_path: Path, index: faiss.Index) -> None:
    """Swap the committed index file for ``index`` and record its checksum, as a buggy writer would."""
    manifest = json.loads((store_path / MANIFEST).read_text())
    data = indexes.index_to_bytes(index)
    (store_path / manifest["index"]["file"]).write_bytes(data)
    manifest["index"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (store_path / MANIFEST).write_text(json.dumps(manifest))


def test_open_refuses_an_index_whose_ids_disagree_with_parquet(store_copy: Path) -> None:
    emb = Store.open(store_copy).embeddings()
    index, _ = indexes.build_index(emb, np.arange(600)[::-1].copy(), "flat", use_gpu=False)
    _replace_index(store_copy, index)
    with pytest.raises(StoreError, match="ids are not the row_ids"):
        Store.open(store_copy)
    assert not validate_store(store_copy).ok


def test_open_refuses_a_store_whose_index_run_did_not_finish(tmp_path: Path) -> None:
    with StoreWriter(tmp_path / "s", dim=4, **IDENTITY) as w:
        w.append(_rows(3), np.eye(3, 4, dtype=np.float32))  # committed, but no finalize (= killed)
    with pytest.raises(StoreError, match="did not finish"):
        Store.open(tmp_path / "s")
    assert len(Store.open(tmp_path / "s", check_index=False)) == 3


def test_connect_exposes_every_view_even_before_results_exist(synthetic_store: Store) -> None:
    con = synthetic_store.connect()
    assert con.sql("SELECT count(*), count(DISTINCT patient_id) FROM images").fetchall() == [(600, 120)]
    types = {r[0]: r[1] for r in con.sql("DESCRIBE embeddings").fetchall()}
    assert types == {"row_id": "BIGINT", "image_id": "VARCHAR", "embedding": "FLOAT[64]"}
    assert "embedding" not in {r[0] for r in con.sql("DESCRIBE images").fetchall()}
    for view, column in (("predictions", "probability"), ("metrics", "ci_low"), ("runs", "created_at"), ("errors", "stage")):
        assert con.sql(f"SELECT count(*) FROM {view}").fetchall() == [(0,)]
        assert column in {r[0] for r in con.sql(f"DESCRIBE {view}").fetchall()}
    sim = con.sql(
        "SELECT array_inner_product(a.embedding, b.embedding) FROM embeddings a, embeddings b WHERE a.row_id = 3 AND b.row_id = 3"
    ).fetchall()[0][0]
    assert sim == pytest.approx(1.0, abs=1e-5)


def test_results_append_atomically_and_show_up_in_sql(store_copy: Path) -> None:
    store = Store.open(store_copy)
    assert store.read_results("runs") is None
    run = pa.table({"run_id": ["r1"], "kind": ["classify"], "created_at": [datetime.now(timezone.utc)],
                    "params": ["{}"], "versions": ["{}"], "timings": ["{}"], "warnings": ["[]"]})
    store.write_results("runs", run)
    store.write_results("runs", run.set_column(0, "run_id", pa.array(["r2"])))
    assert store.read_results("runs").column("run_id").to_pylist() == ["r1", "r2"]
    assert store.connect().sql("SELECT list(run_id ORDER BY run_id) FROM runs").fetchall()[0][0] == ["r1", "r2"]
    with pytest.raises(StoreError, match="missing: \\['timings'\\]"):
        store.write_results("runs", run.drop_columns(["timings"]))
    with pytest.raises(StoreError, match="Unknown results table"):
        store.write_results("models", run)


def test_check_compatible_refuses_another_model(synthetic_store: Store) -> None:
    synthetic_store.check_compatible(**IDENTITY)
    with pytest.raises(StoreMismatchError, match="different model or preprocessing: model_id"):
        synthetic_store.check_compatible("medimageinsight-v1.0.0", "0" * 64, "synthetic")


def test_writer_refuses_another_model(store_copy: Path) -> None:
    with pytest.raises(StoreMismatchError, match="preprocess_fingerprint"):
        StoreWriter(store_copy, dim=64, **{**IDENTITY, "preprocess_fingerprint": "other"}).open()


def test_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with StoreWriter(path, dim=4, **IDENTITY):
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
            StoreWriter(path, dim=4, **IDENTITY).open()
    # a writer killed by SIGKILL leaves its pid in .lock; the kernel released its flock
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    (path / ".lock").write_text(dead)
    with StoreWriter(path, dim=4, **IDENTITY) as w:
        w.append(_rows(2), np.ones((2, 4), np.float32))
        assert len(w.finalize()) == 2


def test_orphan_shards_from_a_killed_commit_are_ignored_then_deleted(store_copy: Path) -> None:
    orphan = store_copy / "embeddings" / "part-00002.parquet"
    shutil.copy(store_copy / "embeddings" / "part-00001.parquet", orphan)  # renamed, manifest never updated
    assert len(Store.open(store_copy)) == 600
    assert any(c.name == "no orphan shards" and c.status == "warn" for c in validate_store(store_copy).checks)
    with StoreWriter(store_copy, dim=64, **IDENTITY) as w:
        assert not orphan.exists()
        w.append(_rows(3, "new"), np.ones((3, 64), np.float32))
        store = w.finalize()
    assert len(store) == 603 and store.metadata(["image_id"]).column("image_id")[-1].as_py() == "new0002"


def test_appending_grows_the_index_in_place(store_copy: Path) -> None:
    rng = np.random.default_rng(5)
    new = rng.normal(size=(4, 64)).astype(np.float32)
    with StoreWriter(store_copy, dim=64, **IDENTITY) as w:
        assert [r.image_id for r in w.pending([])] == []
        w.append(_rows(4, "late"), new)
        store = w.finalize()
    assert store.index().ntotal == 604 and store.index_kind == "flat"
    _, hits = store.index().search(indexes.normalized(new), 1)
    np.testing.assert_array_equal(hits[:, 0], [600, 601, 602, 603])
    assert validate_store(store_copy).ok


def test_append_refuses_ids_already_stored_and_bad_vectors(store_copy: Path) -> None:
    with StoreWriter(store_copy, dim=64, **IDENTITY) as w:
        with pytest.raises(StoreError, match="00000001_000.png"):
            w.append([{"image_id": "00000001_000.png"}], np.ones((1, 64), np.float32))
        with pytest.raises(StoreError, match="NaN"):
            w.append(_rows(1), np.full((1, 64), np.nan, np.float32))
        with pytest.raises(StoreError, match="shape"):
            w.append(_rows(2), np.ones((2, 8), np.float32))
    assert len(Store.open(store_copy)) == 600


def test_errors_describe_the_latest_attempt_at_each_input(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with StoreWriter(path, dim=4, **IDENTITY) as w:
        w.pending([])
        w.record_failures([ReadFailure("a", "/x/a.png", "decode", "truncated"), ReadFailure("b", "/x/b.png", "missing", "gone")])
        w.finalize()
    assert sorted(Store.open(path).errors().column("image_id").to_pylist()) == ["a", "b"]
    with StoreWriter(path, dim=4, **IDENTITY) as w:  # rerun: "a" was fixed and now embeds, "b" still fails
        w.append([{"image_id": "a"}], np.ones((1, 4), np.float32))
        w.record_failures([ReadFailure("b", "/x/b.png", "missing", "gone")])
        store = w.finalize()
    errors = store.errors()
    assert errors.column("image_id").to_pylist() == ["b"]
    assert store.connect().sql("SELECT stage FROM errors").fetchall() == [("missing",)]
    assert json.loads((path / MANIFEST).read_text())["counts"]["errors"] == 1


def test_create_refuses_a_folder_that_is_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "xrays").mkdir()
    (tmp_path / "xrays" / "a.png").write_bytes(b"x")
    with pytest.raises(StoreError, match="not empty and is not a cxr-embed store"):
        build_store_from_arrays(tmp_path / "xrays", np.ones((1, 4)), [{"image_id": "a"}])
    with pytest.raises(StoreError, match="not a cxr-embed store"):
        Store.open(tmp_path / "xrays")


def test_every_index_kind_round_trips_and_validates(tmp_path: Path) -> None:
    emb, rows = make_synthetic_store_arrays()
    for kind in ("ivf", "hnsw", "ivfpq"):
        store = build_store_from_arrays(tmp_path / kind, emb, rows, index_kind=kind)
        assert store.index_kind == kind and store.manifest["index"]["requested"] == kind
        report = validate_store(store.path)
        assert report.ok, report.checks


def test_validate_catches_index_vectors_that_differ_from_parquet(store_copy: Path) -> None:
    index, _ = indexes.build_index(np.random.default_rng(0).normal(size=(600, 64)), np.arange(600), "flat", use_gpu=False)
    _replace_index(store_copy, index)
    Store.open(store_copy)  # ids agree, so open (cheap checks) passes ...
    failed = [c.name for c in validate_store(store_copy).checks if c.status == "fail"]
    assert failed == ["index vectors == Parquet"]  # ... but validate compares the vectors


def test_info_summarises_counts_and_errors(store_copy: Path) -> None:
    with StoreWriter(store_copy, dim=64, **IDENTITY) as w:
        w.record_failures([ReadFailure("zz", "/zz.png", "decode", "bad")])
        w.finalize()
    info = store_info(store_copy)
    assert (info.rows, info.patients, info.dim, info.shards) == (600, 120, 64, 2)
    assert info.labels == {"0": 323, "1": 277} and info.splits == {"train": 480, "test": 120}
    assert info.index_kind == "flat" and info.index_rows == 600
    assert info.errors == 1 and info.errors_by_stage == {"decode": 1}


def test_writer_refuses_object_store_uris_and_accepts_file_uris(tmp_path: Path) -> None:
    from cxr_embed.errors import ConfigError

    ident = {"model_id": "m", "checkpoint_sha256": "0" * 64, "preprocess_fingerprint": "p", "dim": 4}
    with pytest.raises(ConfigError, match="POSIX filesystem"):
        StoreWriter("s3://bucket/stores/cxr14", **ident)
    assert StoreWriter(f"file://{tmp_path}/s", **ident).path == tmp_path / "s"
