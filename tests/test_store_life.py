"""The store's life: it remembers its model, follows metadata edits in the source, erases on request
(atomically, even under SIGKILL), compacts, migrates from version 1, and refuses object-store URIs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from cxr_embed_cli.main import app
from typer.testing import CliRunner

from cxr_embed import indexes
from cxr_embed.errors import ModelNotFoundError, StoreError, StoreLockedError
from cxr_embed.store import (
    MANIFEST,
    SCHEMA_VERSION,
    Store,
    StoreLock,
    StoreWriter,
    build_store_from_arrays,
    load_store_model,
    validate_store,
)

runner = CliRunner()
N, DIM = 48, 16


def _rows(n: int = N) -> list[dict]:
    return [
        {
            "image_id": f"i{i:03d}.png",
            "patient_id": f"p{i // 4:02d}",
            "label": i % 2,
            "split": "train",
            "path": f"/x/i{i:03d}.png",
        }
        for i in range(n)
    ]


def _vectors(n: int = N) -> np.ndarray:
    return np.random.default_rng(7).normal(size=(n, DIM)).astype(np.float32)


@pytest.fixture
def small_store(tmp_path: Path) -> Path:
    """48 rows of 12 patients in 6 shards of 8, with predictions for every row and one error row."""
    from cxr_embed.records import ReadFailure

    path = tmp_path / "store"
    build_store_from_arrays(path, _vectors(), _rows(), shard_size=8)
    with StoreWriter.maintain(path) as w:
        w.record_failures(
            [
                ReadFailure("i005.png", "/x/i005.png", "encode", "nan"),
                ReadFailure("zz.png", "/x/zz.png", "decode", "bad"),
            ]
        )
        w.finalize()
    n = N
    preds = pa.table(
        {
            "run_id": ["r"] * n,
            "plan_id": ["p"] * n,
            "arm": ["a"] * n,
            "classifier": ["lr"] * n,
            "target": ["abnormal"] * n,
            "fold": [0] * n,
            "row_id": list(range(n)),
            "image_id": [f"i{i:03d}.png" for i in range(n)],
            "probability": [0.5] * n,
            "probability_raw": [0.5] * n,
            "label": [i % 2 for i in range(n)],
        }
    )
    Store.open(path).write_results("predictions", preds)
    return path


# ----------------------------------------------------------------------------- the store remembers its model


@pytest.mark.slow  # a classify run and two tiny-model loads
def test_text_search_and_predict_without_model_dir_use_the_recorded_folder(
    tiny_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CXR_EMBED_MODEL_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))  # no pulled model to fall back on
    assert tiny_store.model_dir is not None and Path(tiny_store.model_dir).is_dir()
    result = runner.invoke(
        app, ["search", "--store", str(tiny_store.path), "--text", "pleural effusion", "-k", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["neighbors"]) == 2

    store = tmp_path / "store"
    shutil.copytree(tiny_store.path, store)
    result = runner.invoke(
        app,
        [
            "classify",
            "--store",
            str(store),
            "--models",
            "lr",
            "--folds",
            "2",
            "--bootstrap",
            "0",
            "--no-plots",
        ],
    )
    assert result.exit_code == 0, result.output
    image = Store.open(store).metadata(["path"]).column("path")[0].as_py()
    result = runner.invoke(
        app, ["predict", image, "--store", str(store), "-c", "lr", "--device", "cpu", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert 0.0 <= json.loads(result.stdout)["predictions"][0]["probability"] <= 1.0


def test_a_moved_model_folder_is_named_with_the_checksum_needed(
    tiny_store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CXR_EMBED_MODEL_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    store = tmp_path / "store"
    shutil.copytree(tiny_store.path, store)
    manifest = json.loads((store / MANIFEST).read_text())
    manifest["model_dir"] = str(tmp_path / "moved-away")
    (store / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(
        ModelNotFoundError,
        match=f"moved-away, which is no longer there.*sha256 {tiny_store.checkpoint_sha256}",
    ):
        load_store_model(Store.open(store), device="cpu")
    result = runner.invoke(app, ["search", "--store", str(store), "--text", "effusion"])
    assert result.exit_code == 1 and tiny_store.checkpoint_sha256 in result.stderr


# ----------------------------------------------------------------------------- metadata follows the source


@pytest.mark.slow  # three index reruns of 40 images (no forward passes: everything is stored)
def test_rerun_updates_moved_paths_and_edited_labels_without_reembedding(
    synth_cxr14: Path, tiny_store: Store, tiny_model, tmp_path: Path
) -> None:
    from cxr_embed.job import IndexConfig, run_index

    store, source = tmp_path / "store", tmp_path / "moved"
    shutil.copytree(tiny_store.path, store)
    shutil.copytree(synth_cxr14, source)  # the image folder moved: every path changes
    before = Store.open(store).embeddings()
    config = IndexConfig(device="cpu", workers=0)
    summary = run_index(source, store, config, progress=False, model=tiny_model)
    assert (summary.embedded, summary.updated, summary.missing_from_source) == (0, 40, 0)
    assert all(
        p.startswith(str(source)) for p in Store.open(store).metadata(["path"]).column("path").to_pylist()
    )

    csv = source / "Data_Entry_2017_v2020.csv"
    lines = csv.read_text().splitlines()
    target = next(i for i, line in enumerate(lines) if ",No Finding," in line)
    image_id = lines[target].split(",")[0]
    lines[target] = lines[target].replace(",No Finding,", ",Effusion,")
    dropped = lines.pop(next(i for i in range(1, len(lines)) if i != target))
    csv.write_text("\n".join(lines) + "\n")
    summary = run_index(source, store, config, progress=False, model=tiny_model)
    assert (summary.embedded, summary.updated, summary.missing_from_source, summary.pruned) == (0, 1, 1, 0)
    after = Store.open(store)
    np.testing.assert_array_equal(after.embeddings(), before)  # bit for bit
    meta = {r["image_id"]: r for r in after.metadata(["image_id", "label", "effusion"]).to_pylist()}
    assert meta[image_id]["label"] == 1 and meta[image_id]["effusion"] == 1

    summary = run_index(
        source, store, IndexConfig(device="cpu", workers=0, prune=True), progress=False, model=tiny_model
    )
    assert (summary.pruned, summary.rows) == (1, 39)
    assert (
        dropped.split(",")[0] not in Store.open(store).metadata(["image_id"]).column("image_id").to_pylist()
    )
    assert validate_store(store).ok


# ----------------------------------------------------------------------------- erasure


def test_delete_by_patient_removes_every_trace_and_keeps_the_store_valid(small_store: Path) -> None:
    before = Store.open(small_store)
    emb_before = before.embeddings()
    result = runner.invoke(
        app, ["store", "delete", "--store", str(small_store), "--patient", "p01", "--dry-run", "--json"]
    )
    assert result.exit_code == 0 and json.loads(result.stdout)["matched_rows"] == 4
    assert len(Store.open(small_store)) == N

    result = runner.invoke(
        app, ["store", "delete", "--store", str(small_store), "--patient", "p01", "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["removed_rows"], doc["matched_patients"], doc["rows_left"]) == (4, 1, N - 4)
    store = Store.open(small_store)
    meta = store.metadata(["row_id", "image_id", "patient_id"])
    assert "p01" not in meta.column("patient_id").to_pylist()
    assert meta.column("row_id").to_pylist() == list(range(N - 4))  # dense again
    gone = {f"i{i:03d}.png" for i in range(4, 8)}
    keep = [i for i in range(N) if f"i{i:03d}.png" not in gone]
    np.testing.assert_array_equal(store.embeddings(), emb_before[keep])
    _, hits = store.index().search(indexes.normalized(emb_before), 5)
    assert hits.max() < N - 4 and store.index().ntotal == N - 4
    preds = store.read_results("predictions")
    assert not gone & set(preds.column("image_id").to_pylist()) and preds.num_rows == N - 4
    by_row = dict(zip(meta.column("row_id").to_pylist(), meta.column("image_id").to_pylist(), strict=True))
    assert all(
        by_row[r] == i
        for r, i in zip(preds.column("row_id").to_pylist(), preds.column("image_id").to_pylist(), strict=True)
    )
    assert store.errors().column("image_id").to_pylist() == [
        "zz.png"
    ]  # i005's error row named a deleted image
    audit = store.manifest["audit"][-1]
    assert (audit["action"], audit["rows"], audit["condition"]) == ("delete", 4, "patient")
    assert "p01" not in json.dumps(store.manifest) and "i005" not in json.dumps(store.manifest)
    report = validate_store(small_store)
    assert report.ok and not report.problems, report.problems


def test_delete_by_image_and_where_then_compact(small_store: Path) -> None:
    result = runner.invoke(
        app, ["store", "delete", "--store", str(small_store), "--image", "i000.png", "--image", "i047.png"]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, ["store", "delete", "--store", str(small_store), "--where", "label = 1 AND patient_id = 'p02'"]
    )
    assert result.exit_code == 0, result.output
    store = Store.open(small_store)
    assert len(store) == N - 4 and [a["condition"] for a in store.manifest["audit"]] == ["image", "where"]
    emb = store.embeddings()
    result = runner.invoke(
        app, ["store", "compact", "--store", str(small_store), "--target-rows", "100", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["shards_after"] == 1
    np.testing.assert_array_equal(Store.open(small_store).embeddings(), emb)
    assert validate_store(small_store).ok
    assert len(list((small_store / "embeddings").glob("*.parquet"))) == 1  # superseded shards deleted
    result = runner.invoke(
        app, ["store", "delete", "--store", str(small_store), "--patient", "p03", "--where", "x"]
    )
    assert result.exit_code == 1 and "exactly one condition" in result.stderr


_KILL = """
import os, signal, sys
import cxr_embed.store.writer as w
from cxr_embed.store import delete_rows
real = w.commit_manifest
def commit(*args, **kwargs):
    if sys.argv[1] == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
w.commit_manifest = commit
delete_rows(sys.argv[2], patients=["p01"])
"""


@pytest.mark.slow  # a Python subprocess per case
@pytest.mark.parametrize("moment", ["before", "after"])
def test_sigkill_during_delete_leaves_the_old_or_the_new_store(small_store: Path, moment: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_KILL), moment, str(small_store)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -9, proc.stderr
    assert validate_store(small_store).ok
    assert len(Store.open(small_store)) == (N if moment == "before" else N - 4)
    with StoreWriter.maintain(small_store):  # the next writer removes what the killed one left
        pass
    files = {str(p.relative_to(small_store)) for p in small_store.rglob("*.parquet")} | {
        str(p.relative_to(small_store)) for p in (small_store / "index").iterdir()
    }
    manifest = Store.open(small_store).manifest
    named = (
        {s["file"] for s in manifest["shards"]}
        | {manifest["index"]["file"], manifest["errors_file"]["file"]}
        | {e["file"] for parts in manifest["results"].values() for e in parts}
    )
    assert files == named or (moment == "before" and all(f.startswith("results/") for f in files - named))


# ----------------------------------------------------------------------------- migration, URIs, locks


def test_a_version_1_store_is_refused_until_migrated(small_store: Path) -> None:
    manifest = json.loads((small_store / MANIFEST).read_text())
    (small_store / manifest["index"]["file"]).rename(small_store / "index" / "faiss.index")
    (small_store / manifest["errors_file"]["file"]).rename(small_store / "errors.parquet")
    for shard in manifest["shards"]:
        del shard["bytes"], shard["sha256"]
    for key in ("results", "errors_file", "next_part", "audit", "model_dir"):
        manifest.pop(key)
    for key in ("file", "bytes", "sha256"):
        manifest["index"].pop(key)
    manifest["schema_version"] = 1
    (small_store / MANIFEST).write_text(json.dumps(manifest))
    result = runner.invoke(app, ["store", "info", "--store", str(small_store)])
    assert result.exit_code == 1 and "cxr-embed store migrate" in result.stderr
    result = runner.invoke(app, ["store", "migrate", "--store", str(small_store), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["files_hashed"] == 6 + 1 + 1 + 1
    assert json.loads((small_store / MANIFEST).read_text())["schema_version"] == SCHEMA_VERSION
    assert (
        validate_store(small_store).ok and Store.open(small_store).read_results("predictions").num_rows == N
    )


def test_object_store_uris_are_refused_from_the_cli_and_file_uris_accepted(small_store: Path) -> None:
    for args in (
        ["store", "info"],
        ["sql", "SELECT 1"],
        ["search", "--id", "x"],
        ["store", "delete", "--image", "x"],
    ):
        result = runner.invoke(app, [*args, "--store", "s3://bucket/stores/x"])
        assert result.exit_code == 1 and "POSIX filesystem" in result.stderr and "s3://" in result.stderr, (
            result.output
        )
    assert len(Store.open(f"file://{small_store}")) == N
    result = runner.invoke(app, ["store", "info", "--store", f"file://{small_store}", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["rows"] == N


def test_lock_problems_are_errors_and_the_job_locks_before_loading_the_model(
    small_store: Path, tmp_path: Path
) -> None:
    from cxr_embed.job import IndexConfig, run_index

    with StoreLock(small_store), pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
        run_index(tmp_path, small_store, IndexConfig(model_dir=tmp_path / "no-model-here"), progress=False)
    (small_store / ".lock").write_text("999999999")  # a stale pid left by a killed writer
    fd = os.open(small_store / ".lock", os.O_RDWR)
    from cxr_embed.store.layout import lock_error_holder

    assert "no longer running" in lock_error_holder(fd)
    os.close(fd)
    (small_store / ".lock").unlink()
    (small_store / ".lock").mkdir()
    with pytest.raises(StoreError, match="must be a regular file"):
        StoreWriter.maintain(small_store).open()


# ----------------------------------------------------------------------------- a rerun repairs what it can


def test_a_rerun_rebuilds_a_missing_index_and_re_embeds_a_damaged_shard(small_store: Path) -> None:
    from cxr_embed.records import ImageRecord

    manifest = json.loads((small_store / MANIFEST).read_text())
    (small_store / manifest["index"]["file"]).unlink()
    damaged = small_store / manifest["shards"][2]["file"]
    damaged.write_bytes(damaged.read_bytes()[:100])
    with pytest.raises(StoreError, match="is damaged"):
        Store.open(small_store)
    records = [
        ImageRecord(
            image_id=r["image_id"],
            path=r["path"],
            patient_id=r["patient_id"],
            label=r["label"],
            split=r["split"],
            study=None,
            findings=None,
            sex=None,
            age=None,
            view=None,
            source=None,
        )
        for r in _rows()
    ]
    with StoreWriter.maintain(small_store) as w:
        assert any("index" in r for r in w.repairs) and any(
            "1 damaged shard(s) dropped (8 rows)" in r for r in w.repairs
        )
        todo = w.pending(records)
        assert [r.image_id for r in todo] == [f"i{i:03d}.png" for i in range(16, 24)]
        w.append(todo, _vectors()[16:24])
        store = w.finalize()
    assert len(store) == N and validate_store(small_store).ok
    meta = store.metadata(["image_id"]).column("image_id").to_pylist()
    np.testing.assert_array_equal(store.embeddings()[meta.index("i016.png")], _vectors()[16])
    preds = store.read_results(
        "predictions"
    )  # row_ids of the dropped rows were cleared, the rest follow their image
    by_image = dict(
        zip(preds.column("image_id").to_pylist(), preds.column("row_id").to_pylist(), strict=True)
    )
    assert by_image["i016.png"] is None and by_image["i030.png"] == meta.index("i030.png")


def test_a_reader_overtaken_by_a_delete_is_told_to_rerun(small_store: Path) -> None:
    reader = Store.open(small_store)
    result = runner.invoke(app, ["store", "delete", "--store", str(small_store), "--image", "i001.png"])
    assert result.exit_code == 0, result.output
    with pytest.raises(StoreError, match="changed by another cxr-embed process"):
        reader.embeddings()


def test_results_computed_before_a_delete_are_refused(small_store: Path) -> None:
    reader = Store.open(small_store)
    preds = reader.read_results("predictions")
    assert (
        runner.invoke(app, ["store", "delete", "--store", str(small_store), "--patient", "p02"]).exit_code
        == 0
    )
    with pytest.raises(StoreError, match="were removed .* while this command ran"):
        reader.write_results("predictions", preds)
    assert (
        "i008.png" not in Store.open(small_store).read_results("predictions").column("image_id").to_pylist()
    )
    assert not [
        p
        for p in (small_store / "results" / "predictions").iterdir()
        if f"results/predictions/{p.name}"
        not in {e["file"] for e in Store.open(small_store).manifest["results"]["predictions"]}
    ]
