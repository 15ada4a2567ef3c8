"""``cxr-embed model info|pull`` and ``cxr-embed encode`` on a folder in the official layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from cxr_embed_cli.main import app
from typer.testing import CliRunner

from cxr_embed.model import tiny_model_dir
from cxr_embed.model.files import sha256_file

REF = Path(__file__).parent / "data" / "reference"
ACCEPTED = ("01_cxr_gray8_1024x1024.png", "03_rgb_800x600.jpg", "04_tiny_gray8_60x40.png",
            "05_wide_gray8_1600x100.png")
runner = CliRunner()


@pytest.fixture(scope="module")
def official_layout(tmp_path_factory) -> Path:
    """A copy of the tiny model laid out exactly like the official 2024.09.27/ folder."""
    folder = tmp_path_factory.mktemp("official") / "2024.09.27"
    shutil.copytree(tiny_model_dir(), folder)
    assert (folder / "vision_model" / "medimageinsigt-v1.0.0.pt").is_file()
    assert (folder / "language_model" / "clip_tokenizer_4.16.2" / "merges.txt").is_file()
    return folder


def test_encode_reproduces_reference_embeddings(official_layout, tmp_path):
    texts = json.loads((REF / "texts.json").read_text(encoding="utf-8"))["texts"]
    images = [str(REF / "images" / name) for name in ACCEPTED]
    args = ["encode", *images, "--model-dir", str(official_layout), "--out", str(tmp_path / "e.npy"),
            "--device", "cpu", "--json"]
    for text in texts:
        args += ["--text", text]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["shape"] == [10, 32] and summary["failed"] == []
    assert [r["kind"] for r in summary["rows"]] == ["image"] * 4 + ["text"] * 6
    emb = np.load(tmp_path / "e.npy")
    assert np.abs(emb[:4] - np.load(REF / "image_embeddings.npy")).max() <= 1e-5
    assert np.abs(emb[4:] - np.load(REF / "text_embeddings.npy")).max() <= 1e-5


def test_encode_parquet_keeps_row_alignment_and_exits_2(official_layout, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "e.parquet"
    result = runner.invoke(app, ["encode", str(bad), "--text", "Pleural effusion", "--raw", "--model-dir",
                                 str(official_layout), "--out", str(out), "--device", "cpu", "--json"])
    assert result.exit_code == 2, result.output  # partial: the rest written, the failure listed
    assert json.loads(result.stdout)["failed"][0]["path"] == str(bad)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Warning: NaN row for")
    table = pq.read_table(out)
    assert table.column("kind").to_pylist() == ["image", "text"]
    assert table.column("source").to_pylist() == [str(bad), "Pleural effusion"]
    assert table.column("error")[0].as_py() and table.column("error")[1].as_py() is None
    raw = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    assert np.isnan(raw[0]).all()
    normalised = np.load(REF / "text_embeddings.npy")[1]
    assert np.abs(raw[1] / np.linalg.norm(raw[1]) - normalised).max() < 1e-5 and np.linalg.norm(raw[1]) != 1.0
    assert table.column("checkpoint_sha256")[0].as_py() == sha256_file(official_layout / "vision_model" /
                                                                     "medimageinsigt-v1.0.0.pt")


def test_encode_npy_with_a_failure_is_refused_unless_skip_failed(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    good = str(REF / "images" / ACCEPTED[2])
    out = tmp_path / "e.npy"
    args = ["encode", good, str(bad), good, "--model-dir", str(tiny_model_dir()), "--out", str(out), "--device", "cpu"]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1 and "row i of a .npy would not be input i" in refused.stderr
    assert not out.exists()
    skipped = runner.invoke(app, [*args, "--skip-failed"])
    assert skipped.exit_code == 2, skipped.output
    assert np.load(out).shape == (2, 32)
    assert skipped.stdout.splitlines()[0] == "row\tkind\tsource\terror"  # piped summary: TSV
    nothing = runner.invoke(app, ["encode", str(bad), "--model-dir", str(tiny_model_dir()), "--out", str(out)])
    assert nothing.exit_code == 1 and "None of the 1 image(s) could be read" in nothing.stderr


def test_encode_refuses_bad_output_suffix_and_empty_input(tmp_path):
    result = runner.invoke(app, ["encode", "--text", "x", "--out", str(tmp_path / "e.csv"),
                                 "--model-dir", str(tiny_model_dir())])
    assert result.exit_code == 1 and ".npy or .parquet" in result.output
    result = runner.invoke(app, ["encode", "--out", str(tmp_path / "e.npy"), "--model-dir", str(tiny_model_dir())])
    assert result.exit_code == 1 and "Nothing to encode" in result.output


def test_model_info_json(official_layout):
    result = runner.invoke(app, ["model", "info", "--model-dir", str(official_layout), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["parameters"] == {"image_tower": 740_480, "text_tower": 1_608_992, "projections": 5_120,
                                  "logit_scale": 1, "total": 2_354_593}
    assert data["checkpoint_sha256"] == sha256_file(official_layout / "vision_model" / "medimageinsigt-v1.0.0.pt")
    assert data["official_weights"] is False and data["device"] == "cpu" and data["embed_dim"] == 32
    tsv = runner.invoke(app, ["model", "info", "--model-dir", str(official_layout), "--device", "cpu"])
    assert tsv.stdout.splitlines()[0] == "field\tvalue" and "parameters.total\t2354593" in tsv.stdout


def test_missing_model_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_EMBED_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CXR_EMBED_MODEL_DIR", raising=False)
    result = runner.invoke(app, ["model", "info"])
    assert result.exit_code == 1
    assert "cxr-embed model pull" in result.output and "Traceback" not in result.output


def test_pull_offline_explains_manual_placement(tmp_path):
    result = runner.invoke(app, ["model", "pull", "--dir", str(tmp_path), "--endpoint", "http://127.0.0.1:9"])
    assert result.exit_code == 1, result.output
    message = " ".join(result.output.split())
    assert "Could not download config.yaml" in message and "Connection refused" in message
    assert "copy the folder 2024.09.27/" in message and "--model-dir" in message
