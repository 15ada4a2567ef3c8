"""`cxr-embed index` and `cxr-embed store info|validate` as a user runs them, SIGKILL included."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cxr_embed_cli.main import app
from typer.testing import CliRunner

from cxr_embed.model import tiny_model_dir
from cxr_embed.store import MANIFEST, Store

runner = CliRunner()


def _env() -> dict[str, str]:
    return {**os.environ, "CXR_EMBED_MODEL_DIR": str(tiny_model_dir())}


def _committed_rows(store: Path) -> int:
    try:
        return json.loads((store / MANIFEST).read_text())["counts"]["rows"]
    except (FileNotFoundError, ValueError):
        return 0


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_store(synth_cxr14: Path, tiny_store: Store, tmp_path: Path) -> None:
    store = tmp_path / "store"
    args = [str(synth_cxr14), "--store", str(store), "--limit", "8", "--shard-size", "4", "--batch-size", "2",
            "--workers", "1", "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-m", "cxr_embed_cli.main", "index", *args], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _committed_rows(store) < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no clean-up of any kind: lock, workers, half-written files
    proc.wait()
    at_kill = _committed_rows(store)
    assert 4 <= at_kill < 8, f"the run was not killed mid-way ({at_kill} rows; stderr: {proc.stderr.read()[-500:]!r})"

    result = runner.invoke(app, ["index", *args, "--json"], env=_env())
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["already_stored"], summary["embedded"], summary["rows"]) == (at_kill, 8 - at_kill, 8)

    resumed = Store.open(store)  # also proves FAISS ids == row_ids
    reference_meta = tiny_store.metadata().slice(0, 8)
    assert resumed.metadata().equals(reference_meta)  # same rows, row_ids and metadata as one clean run
    np.testing.assert_allclose(resumed.embeddings(), tiny_store.embeddings()[:8], atol=1e-6, rtol=0)
    assert sorted(p.name for p in (store / "embeddings").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert runner.invoke(app, ["store", "validate", "--store", str(store)]).exit_code == 0


def test_index_refuses_a_store_of_another_model(synthetic_store: Store, synth_cxr14: Path, tmp_path: Path) -> None:
    dst = tmp_path / "store"
    shutil.copytree(synthetic_store.path, dst)
    result = runner.invoke(app, ["index", str(synth_cxr14), "--store", str(dst), "--device", "cpu"], env=_env())
    assert result.exit_code == 1
    assert "different model or preprocessing" in result.stderr and "Traceback" not in result.output


def test_store_info_and_validate_report_counts_and_agreement(tiny_store: Store) -> None:
    result = runner.invoke(app, ["store", "info", "--store", str(tiny_store.path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["rows"], info["dim"], info["index_kind"], info["index_rows"], info["errors"]) == (40, 32, "flat", 40, 0)
    result = runner.invoke(app, ["store", "validate", "--store", str(tiny_store.path), "--json"])
    report = json.loads(result.stdout)
    assert result.exit_code == 0 and report["ok"] is True
    assert {c["name"] for c in report["checks"]} >= {"index ids == row_ids", "index vectors == Parquet"}


def test_validate_exits_1_on_a_damaged_index(synthetic_store: Store, tmp_path: Path) -> None:
    dst = tmp_path / "store"
    shutil.copytree(synthetic_store.path, dst)
    Store.open(dst).index_path.write_bytes(b"not a faiss index")
    result = runner.invoke(app, ["store", "validate", "--store", str(dst)])
    assert result.exit_code == 1 and "FAILED" in result.stderr and "\tfail" in result.stdout
    result = runner.invoke(app, ["store", "info", "--store", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "not a cxr-embed store" in result.stderr


def test_index_help_documents_every_option() -> None:
    result = runner.invoke(app, ["index", "--help"])
    for option in ("--store", "--dataset", "--model-dir", "--device", "--precision", "--batch-size", "--workers",
                   "--limit", "--shard-size", "--index", "--engine", "--json"):
        assert option in result.stdout


def test_index_exits_2_when_some_inputs_failed_and_1_on_an_empty_source(tmp_path: Path) -> None:
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(images / "good.png")
    (images / "broken.png").write_bytes(b"not a png")
    store = tmp_path / "store"
    args = ["--store", str(store), "--dataset", "folder", "--device", "cpu", "--workers", "0"]
    result = runner.invoke(app, ["index", str(images), *args, "--json"], env=_env())
    assert result.exit_code == 2, result.output
    summary = json.loads(result.stdout)
    assert (summary["listed"], summary["embedded"], summary["failed"]) == (2, 1, 1)
    piped = runner.invoke(app, ["index", str(images), *args], env=_env())  # rerun: the failure is retried
    assert piped.exit_code == 2 and piped.stdout.splitlines()[0] == "field\tvalue", piped.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["index", str(empty), "--store", str(tmp_path / "s2"), "--device", "cpu"], env=_env())
    assert result.exit_code == 1 and result.stderr.startswith(f"Error: No images found in {empty}"), result.output
    assert ".png" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "s2").exists()  # refused by the library before any store was made
    fields = dict(line.split("\t") for line in piped.stdout.splitlines()[1:])
    assert (fields["listed"], fields["stored"], fields["failed"], fields["skipped"]) == ("2", "1", "1", "0")
