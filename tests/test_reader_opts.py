"""The shared reader options (cli/reader_opts.py): every flag reaches the reader, on index and finetune."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from cxr_embed_cli.main import app
from cxr_embed_cli.reader_opts import with_reader_options
from PIL import Image
from typer.testing import CliRunner

runner = CliRunner()
probe = typer.Typer()
seen: dict[str, Any] = {}


@probe.command()
@with_reader_options
def show(source: Path, reader_options: dict | None = None, link_file: Path | None = None) -> None:
    seen.update(source=source, reader_options=reader_options, link_file=link_file)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--labels", "meta.csv"], {"labels": "meta.csv"}),
        (["--path-column", "file"], {"path_column": "file"}),
        (["--id-column", "uid"], {"id_column": "uid"}),
        (["--label-column", "y"], {"label_column": "y"}),
        (["--findings-column", "dx"], {"findings_column": "dx"}),
        (["--patient-column", "pid"], {"patient_column": "pid"}),
        (["--study-column", "visit"], {"study_column": "visit"}),
        (["--split-column", "fold"], {"split_column": "fold"}),
        (["--skip-missing"], {"skip_missing": True}),
        (["--key-file", "k.key"], {"key_file": "k.key"}),
        (["--modality", "CR", "--modality", "DX,CT"], {"modality": ["CR", "DX,CT"]}),
        (["--body-part", "any"], {"body_part": ["any"]}),
        (["--allow-burned-in"], {"allow_burned_in": True}),
        (["--frames", "all"], {"frames": "all"}),
        (["--follow-symlinks"], {"follow_symlinks": True}),
        ([], {}),  # nothing given: nothing passed, so every reader accepts the call
    ],
)
def test_each_option_becomes_its_reader_keyword(args: list[str], expected: dict[str, Any]) -> None:
    result = runner.invoke(probe, ["src", *args])
    assert result.exit_code == 0, result.output
    assert seen["reader_options"] == expected and seen["link_file"] is None


def test_link_file_is_passed_apart_and_help_explains_every_option() -> None:
    assert runner.invoke(probe, ["src", "--link-file", "l.csv"]).exit_code == 0
    assert seen["link_file"] == Path("l.csv") and seen["reader_options"] == {}
    for command, flags in (("index", 17), ("finetune", 16)):  # finetune writes no store paths: no --link-file
        text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).stdout
        assert "─ Reading the dataset ─" in text  # one help panel for them
        assert sum(f in text for f in ("--labels", "--path-column", "--id-column", "--label-column",
                                       "--findings-column", "--patient-column", "--study-column",
                                       "--split-column", "--skip-missing", "--key-file", "--link-file",
                                       "--modality", "--body-part", "--allow-burned-in", "--frames",
                                       "--follow-symlinks", "DICOM")) == flags  # fmt: skip


@pytest.fixture
def png_folder(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(src / f"{i}.png")
    (src / "meta.csv").write_text("file,y\n0.png,0\n1.png,1\n")
    return src


@pytest.mark.parametrize("command", ["index", "finetune"])
def test_options_reach_the_listing_before_any_model_loads(
    png_folder: Path, tmp_path: Path, command: str
) -> None:
    def run(name: str, *options: str):
        where = [
            "--store" if command == "index" else "--out",
            str(tmp_path / name),
        ]  # finetune keeps its --out
        return runner.invoke(app, [command, str(png_folder), *where, "--device", "cpu", *options])

    wrong = run("a", "--key-file", "k.key")  # a DICOM option on a PNG folder
    assert wrong.exit_code == 1 and "no option --key-file" in wrong.stderr and "Traceback" not in wrong.output
    missing = run("b", "--labels", str(tmp_path / "nope.csv"))
    assert missing.exit_code == 1 and "nope.csv" in missing.stderr
    column = run("c", "--labels", str(png_folder / "meta.csv"), "--label-column", "nope")
    assert column.exit_code == 1 and "no column 'nope'" in column.stderr


@pytest.mark.slow
def test_index_with_a_custom_label_csv(png_folder: Path, tmp_path: Path) -> None:
    from cxr_embed.model import tiny_model_dir
    from cxr_embed.store import Store

    store = tmp_path / "store"
    args = ["index", str(png_folder), "--store", str(store), "--device", "cpu", "--workers", "0", "--model-dir",
            str(tiny_model_dir()), "--labels", str(png_folder / "meta.csv"), "--path-column", "file",
            "--label-column", "y"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    meta = Store.open(store).metadata(["image_id", "label"]).to_pylist()
    assert meta == [{"image_id": "0.png", "label": 0}, {"image_id": "1.png", "label": 1}]
