"""read_dataset: layout detection, dispatch, strict vs lenient failure handling."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from cxr_embed.errors import ConfigError, InputError
from cxr_embed.readers import detect_dataset, read_dataset
from cxr_embed.records import FINDINGS, ImageRecord, ReadFailure


def test_contract_types() -> None:
    assert len(FINDINGS) == 14 and FINDINGS[-2:] == ("pleural_thickening", "hernia")
    assert [f.name for f in dataclasses.fields(ImageRecord)] == [
        "image_id", "path", "patient_id", "study", "split", "label", "findings", "sex", "age", "view", "source",
        "stored_path", "modality", "body_part", "photometric", "bits_stored", "rows", "columns",
        "pixel_spacing_row", "pixel_spacing_col", "manufacturer", "model_name", "frames", "frame",
    ]  # fmt: skip
    assert [f.name for f in dataclasses.fields(ReadFailure)] == ["image_id", "path", "stage", "reason"]


def test_synth_fixture_reads_back_as_chestxray14(synth_cxr14: Path) -> None:
    assert detect_dataset(synth_cxr14) == "chestxray14"
    errors: list = []
    records = read_dataset(synth_cxr14, errors=errors)
    assert errors == [] and len(records) == 40
    assert sum(r.label for r in records) == 20 and len({r.patient_id for r in records}) == 15
    assert sum(r.split == "test" for r in records) == 9
    assert read_dataset(synth_cxr14 / "Data_Entry_2017_v2020.csv") == records  # the CSV itself works too


def test_lenient_mode_collects_failures(synth_cxr14: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(synth_cxr14, tmp_path / "copy"))
    victim = next((root / "images_001" / "images").glob("*.png"))
    victim.unlink()
    errors: list = []
    records = read_dataset(root, errors=errors)
    assert len(records) == 39 and errors == [
        ReadFailure(
            victim.name,
            str(root.resolve() / victim.name),
            "missing",
            "listed in the CSV but no such PNG on disk",
        )
    ]


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read_dataset(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="Unknown dataset kind"):
        read_dataset(tmp_path, "nifti")
    with pytest.raises(ConfigError, match="no option --no-such-option .it takes"):
        read_dataset(tmp_path, "folder", no_such_option=1)
