"""ChestX-ray14 reader: both Data_Entry header variants, findings, split lists, layouts, failures."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cxr_embed.errors import CsvFormatError, CxrEmbedError, InputError
from cxr_embed.readers import read_dataset
from cxr_embed.readers.chestxray14 import (
    expand_header,
    format_finding_labels,
    parse_data_entry,
    parse_finding_labels,
)
from cxr_embed.records import FINDINGS, FailureSink

# The 2017 file as NIH/Kaggle ship it: unquoted bracket headers and a trailing comma on every line.
DATA_ENTRY_2017 = """\
Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],
00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143,
00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143,
00000001_002.png,Cardiomegaly|Effusion,2,1,58,M,PA,2500,2048,0.168,0.168,
00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.171,0.171,
00000003_000.png,Hernia,0,3,081Y,F,PA,2582,2991,0.143,0.143,
00000004_000.png,Mass|Nodule,0,4,82,M,AP,2500,2048,0.168,0.168,
00000005_000.png,No Finding,0,5,69,F,PA,2048,2500,0.168,0.168,
00000005_001.png,Pleural_Thickening|Atelectasis|Infiltration,1,5,69,F,AP,2048,2500,0.168,0.168,
"""
# The v2020 file: no trailing comma, "Patient Sex".
DATA_ENTRY_2020 = """\
Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Sex,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]
00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143
00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143
00000001_002.png,Cardiomegaly|Effusion,2,1,58,M,PA,2500,2048,0.168,0.168
00000002_000.png,No Finding,0,2,80,M,PA,2500,2048,0.171,0.171
00000003_000.png,Hernia,0,3,74,F,PA,2582,2991,0.143,0.143
00000004_000.png,Mass|Nodule,0,4,82,M,AP,2500,2048,0.168,0.168
00000005_000.png,No Finding,0,5,69,F,PA,2048,2500,0.168,0.168
00000005_001.png,Pleural_Thickening|Atelectasis|Infiltration,1,5,69,F,AP,2048,2500,0.168,0.168
"""
IMAGES = [line.split(",")[0] for line in DATA_ENTRY_2020.splitlines()[1:]]


def make_dataset(root: Path, csv_name: str, csv_text: str, layout: str = "split") -> Path:
    """A ChestX-ray14 folder with tiny PNGs: "split" = images_001/images + images_002/images, "flat" = images/."""
    root.mkdir(parents=True, exist_ok=True)
    (root / csv_name).write_text(csv_text)
    for i, name in enumerate(IMAGES):
        folder = root / (f"images_{1 + i // 4:03d}/images" if layout == "split" else "images")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), 100).save(folder / name)
    return root


@pytest.mark.parametrize(
    ("csv_name", "csv_text"),
    [("Data_Entry_2017.csv", DATA_ENTRY_2017), ("Data_Entry_2017_v2020.csv", DATA_ENTRY_2020)],
)
@pytest.mark.parametrize("layout", ["split", "flat"])
def test_both_header_variants_and_layouts(tmp_path: Path, csv_name: str, csv_text: str, layout: str) -> None:
    root = make_dataset(tmp_path / "cxr14", csv_name, csv_text, layout)
    errors: list = []
    records = read_dataset(root, errors=errors)
    assert errors == []
    assert [r.image_id for r in records] == IMAGES
    assert sum(r.label == 0 for r in records) == 2 and sum(r.label == 1 for r in records) == 6
    by_id = {r.image_id: r for r in records}
    emphysema = by_id["00000001_001.png"]
    assert [FINDINGS[i] for i, f in enumerate(emphysema.findings) if f] == ["cardiomegaly", "emphysema"]
    last = by_id["00000005_001.png"]
    assert [FINDINGS[i] for i, f in enumerate(last.findings) if f] == [
        "atelectasis",
        "infiltration",
        "pleural_thickening",
    ]
    assert by_id["00000002_000.png"].findings == (0,) * 14
    assert (last.patient_id, last.study, last.sex, last.view, last.source) == (
        "5",
        1,
        "F",
        "AP",
        "chestxray14",
    )
    assert by_id["00000003_000.png"].age in (81.0, 74.0)  # "081Y" (early releases) parses too
    assert all(Path(r.path).is_file() and Path(r.path).is_absolute() for r in records)
    assert all(r.split is None for r in records)  # no split lists in this folder


def test_expand_header_splits_bracket_fields() -> None:
    fields = DATA_ENTRY_2017.splitlines()[0].split(",")
    names = expand_header(fields)
    assert names[7:11] == [
        "OriginalImage[Width]", "OriginalImage[Height]", "OriginalImagePixelSpacing[x]", "OriginalImagePixelSpacing[y]"
    ]  # fmt: skip
    assert names[-1] == ""  # the 2017 trailing comma


def test_missing_and_unlisted_images_are_reported(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "cxr14", "Data_Entry_2017_v2020.csv", DATA_ENTRY_2020)
    (root / "images_001/images/00000001_000.png").unlink()
    Image.new("L", (8, 8)).save(root / "images_002/images/99999999_000.png")
    errors: list = []
    records = read_dataset(root, "chestxray14", errors=errors)
    assert len(records) == len(IMAGES) - 1
    assert {(e.image_id, e.stage) for e in errors} == {
        ("00000001_000.png", "missing"),
        ("99999999_000.png", "unlisted"),
    }
    with pytest.raises(InputError, match="00000001_000.png"):
        read_dataset(root, "chestxray14")  # strict mode raises on the first problem
    errors = []
    assert len(read_dataset(root, skip_missing=True, errors=errors)) == len(IMAGES) - 1  # partial download
    assert [e.stage for e in errors] == ["unlisted"]


def test_official_split_lists_are_honoured(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "cxr14", "Data_Entry_2017_v2020.csv", DATA_ENTRY_2020)
    (root / "train_val_list.txt").write_text(
        "\n".join(i for i in IMAGES if not i.startswith("00000005")) + "\n"
    )
    (root / "test_list.txt").write_text("00000005_000.png\n00000005_001.png\n")
    records = read_dataset(root)
    splits = {r.image_id: r.split for r in records}
    assert splits["00000005_001.png"] == "test" and splits["00000001_002.png"] == "train"
    train = {r.patient_id for r in records if r.split == "train"}
    test = {r.patient_id for r in records if r.split == "test"}
    assert train and test and not train & test
    assert all(r.split is None for r in read_dataset(root, splits=False))


def test_patient_on_both_sides_of_the_split_is_refused(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "cxr14", "Data_Entry_2017_v2020.csv", DATA_ENTRY_2020)
    (root / "train_val_list.txt").write_text("00000005_000.png\n")
    (root / "test_list.txt").write_text("00000005_001.png\n")
    with pytest.raises(CsvFormatError, match="both train and test"):
        read_dataset(root, errors=[])


def test_bad_rows_are_skipped_and_recorded(tmp_path: Path) -> None:
    text = (
        DATA_ENTRY_2020
        + "00000006_000.png,Dragon Scales,0,6,40,M,PA,1,1,0.1,0.1\n00000007_000.png,Mass,0,7\n"
    )
    errors: list = []
    rows = parse_data_entry(text, sink=FailureSink(errors))
    assert len(rows) == len(IMAGES)
    assert [e.image_id for e in errors] == ["00000006_000.png", "00000007_000.png"]
    assert "Dragon Scales" in errors[0].reason and "fields" in errors[1].reason
    with pytest.raises(CsvFormatError, match="line 10"):
        parse_data_entry(text)


def test_required_columns_and_no_csv(tmp_path: Path) -> None:
    with pytest.raises(CsvFormatError, match="Finding Labels"):
        parse_data_entry("Image Index,Patient ID\nx.png,1\n")
    with pytest.raises(InputError, match="Data_Entry"):
        read_dataset(tmp_path, "chestxray14")


def test_finding_labels_round_trip() -> None:
    flags = parse_finding_labels("Effusion|Pleural_Thickening")
    assert flags[FINDINGS.index("effusion")] == 1 and flags[FINDINGS.index("pleural_thickening")] == 1
    assert sum(flags) == 2
    assert format_finding_labels(flags) == "Effusion|Pleural_Thickening"
    assert format_finding_labels((0,) * 14) == "No Finding"
    with pytest.raises(ValueError, match="No Finding"):
        parse_finding_labels("No Finding|Mass")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.text(max_size=400),
        st.lists(
            st.sampled_from(DATA_ENTRY_2017.splitlines() + ["", ",,,", '"', "a|b", "x.png,Mass|,0,1,5,M"]),
            max_size=8,
        ).map("\n".join),
    )
)
def test_csv_parser_fuzz_only_typed_errors(text: str) -> None:
    errors: list = []
    try:
        rows = parse_data_entry(text, sink=FailureSink(errors))
    except CxrEmbedError:
        return
    for row in rows:
        assert len(row["findings"]) == 14 and row["label"] in (0, 1)
