"""Generic folder reader: labels from sub-folder names or from a CSV with user-chosen columns."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cxr_embed.errors import ConfigError, CsvFormatError, CxrEmbedError, InputError
from cxr_embed.readers import read_dataset
from cxr_embed.records import FINDINGS


def put(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), 90).save(root / name)


def test_labels_from_subfolders(tmp_path: Path) -> None:
    put(tmp_path, "normal/a.png", "abnormal/b.jpg", "Abnormal/c.png", "siteA/d.png", "e.png")
    (tmp_path / "notes.txt").write_text("not an image")
    records = read_dataset(tmp_path)
    assert {r.image_id: r.label for r in records} == {
        "Abnormal/c.png": 1, "abnormal/b.jpg": 1, "e.png": None, "normal/a.png": 0, "siteA/d.png": None
    }  # fmt: skip
    assert all(r.source == "folder" and Path(r.path).is_absolute() for r in records)


def test_labels_from_csv_with_chosen_columns(tmp_path: Path) -> None:
    put(tmp_path, "img/1.png", "img/2.png", "img/3.png")
    (tmp_path / "meta.csv").write_text(
        "file_path,diagnosis,pid,visit,sex,age,view\n"
        "img/1.png,normal,P1,0,F,40,pa\n"
        "img/2.png,abnormal,P1,1,F,41,AP\n"
        "img/3.png,1,P2,0,M,,\n"
    )
    records = read_dataset(
        tmp_path, "folder", labels=tmp_path / "meta.csv", path_column="file_path", label_column="diagnosis",
        patient_column="pid", study_column="visit",
    )  # fmt: skip
    assert [(r.image_id, r.label, r.patient_id, r.study) for r in records] == [
        ("img/1.png", 0, "P1", 0), ("img/2.png", 1, "P1", 1), ("img/3.png", 1, "P2", 0)
    ]  # fmt: skip
    assert (records[0].sex, records[0].age, records[0].view) == ("F", 40.0, "PA")
    with pytest.raises(ConfigError, match="no column 'nope'"):
        read_dataset(tmp_path, "folder", labels=tmp_path / "meta.csv", path_column="nope")


def test_default_labels_csv_with_findings_missing_and_unlisted(tmp_path: Path) -> None:
    put(tmp_path, "a.png", "b.png", "extra.png")
    (tmp_path / "labels.csv").write_text(
        "path,finding_labels,split\na.png,Effusion|Mass,test\nb.png,No Finding,train_val\ngone.png,Mass,train\n"
    )
    errors: list = []
    records = read_dataset(tmp_path, errors=errors)
    a, b = records
    assert a.label == 1 and a.findings[FINDINGS.index("effusion")] == 1 and sum(a.findings) == 2
    assert (b.label, b.split, a.split) == (0, "train", "test")
    assert {(e.image_id, e.stage) for e in errors} == {("gone.png", "missing"), ("extra.png", "unlisted")}
    with pytest.raises(InputError, match="gone.png"):
        read_dataset(tmp_path)


def test_bad_rows_are_reported(tmp_path: Path) -> None:
    put(tmp_path, "a.png", "b.png")
    (tmp_path / "labels.csv").write_text("path,label\na.png,maybe\nb.png,0\n")
    errors: list = []
    records = read_dataset(tmp_path, errors=errors)
    assert [r.image_id for r in records] == ["b.png"]
    assert errors[0].stage == "csv" and "maybe" in errors[0].reason
    (tmp_path / "labels.csv").write_text("label\n1\n")
    with pytest.raises(CsvFormatError, match="no image path column"):
        read_dataset(tmp_path, errors=[])


def test_synthetic_folder_layout_reads_back(tmp_path: Path) -> None:
    from cxr_embed.synth import generate

    generate(tmp_path, 8, layout="folder", seed=2, size=48)
    errors: list = []
    records = read_dataset(tmp_path, errors=errors)
    assert errors == [] and len(records) == 8
    assert all(r.image_id.startswith("abnormal/" if r.label else "normal/") for r in records)
    assert all(r.patient_id and r.split in ("train", "test") for r in records)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(
        st.sampled_from(
            [
                "path,label,patient_id,study,age,split,finding_labels",
                "a.png,1,P,0,40,train,Mass",
                "a.png,x,,y,z,q,",
                "b.png,0",
                '"a.png',
                "",
                ",,,,,,,,,",
                "a.png,normal,P,1,058Y,test,No Finding|Mass",
                "\x00",
            ]
        ),
        max_size=6,
    ).map("\n".join)
    | st.text(max_size=200)
)
def test_label_csv_fuzz_only_typed_errors(tmp_path: Path, text: str) -> None:
    root = tmp_path / "fuzz"
    if not root.exists():
        put(root, "a.png")
    (root / "labels.csv").write_text(text)
    try:
        records = read_dataset(root, "folder", errors=[])
    except CxrEmbedError:
        return
    assert all(r.label in (0, 1, None) for r in records)
