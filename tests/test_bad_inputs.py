"""No input stops a run (issue 15, item 3): odd folder entries are recorded, never crash, hang or vanish.

Every corpus checks ``listed = stored + failed + skipped``: each input the listing saw is either a
store row or an ``errors.parquet`` row.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_embed.errors import ConfigError
from cxr_embed.job import IndexConfig, run_index
from cxr_embed.listing import accounting, list_source, read_link_file
from cxr_embed.readers import read_dataset
from cxr_embed.store import Store

KEY = "bad-input-test-key-0123456789"


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40), dtype=np.uint8)).save(path)


def _odd_entries(root: Path, outside: Path, suffix: str, make) -> None:
    """A symlink loop, a link out of the source, a broken link, a FIFO, a socket, a non-UTF-8 name."""
    make(outside, 90)
    os.symlink(root, root / "loop")  # a folder linking to its parent
    os.symlink(outside, root / f"outside{suffix}")
    os.symlink(root / "nowhere", root / f"broken{suffix}")
    os.symlink(root / f"self{suffix}", root / f"self{suffix}")  # a link to itself (ELOOP)
    os.mkfifo(root / f"fifo{suffix}")  # opening it would block forever
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / f"sock{suffix}"))
    sock.close()
    make(Path(os.fsdecode(os.fsencode(root) + b"/latin1-\xe9t\xe9" + suffix.encode())), 91)


def _check_accounting(store_dir: Path, listed: int, summary) -> Store:
    """``listed = stored + failed + skipped`` in the run's summary and in the store's files."""
    store = Store.open(store_dir)
    assert len(store) + store.errors().num_rows == listed
    stored = summary.already_stored + summary.embedded
    assert accounting(listed, stored, summary.failures_by_stage)["balanced"], summary.failures_by_stage
    return store


@pytest.mark.slow
def test_folder_with_odd_entries_indexes_the_good_images(tmp_path: Path, tiny_model) -> None:
    src = tmp_path / "src"
    for i in range(3):
        _png(src / "normal" / f"{i}.png", i)
    _odd_entries(src, tmp_path / "elsewhere" / "x.png", ".png", _png)
    listing = list_source(src, "folder")
    stages = sorted(f.stage for f in listing.failures)
    assert stages == ["file_name", "special_file", "special_file", "symlink", "symlink", "symlink", "symlink"]
    assert all(f.image_id.encode("utf-8") for f in listing.failures)  # storable strings
    summary = run_index(
        src, tmp_path / "store", IndexConfig(device="cpu", workers=0), progress=False, model=tiny_model
    )
    assert summary.embedded == 3
    store = _check_accounting(tmp_path / "store", listing.listed, summary)
    assert "latin1-\\xe9t\\xe9.png" in store.errors().column("image_id").to_pylist()

    followed = read_dataset(src, "folder", follow_symlinks=True, errors=(errors := []))
    assert "x.png" in {Path(r.path).name for r in followed}  # asked for: the link out of the source is read
    assert any("loop" in f.reason for f in errors)  # and the loop is listed once, not forever


@pytest.mark.slow
def test_dicom_folder_with_odd_entries_keeps_odd_names_losslessly(tmp_path: Path, tiny_model) -> None:
    from test_dicom_deid import write_dicom

    src, links = tmp_path / "src", tmp_path / "links.csv"
    for i in range(2):
        write_dicom(src / "p" / f"{i}.dcm", i)
    _odd_entries(src, tmp_path / "elsewhere" / "x.dcm", ".dcm", write_dicom)
    key = tmp_path / "key"
    key.write_text(KEY)
    config = IndexConfig(device="cpu", workers=0, reader_options={"key_file": str(key)}, link_file=links)
    listing = list_source(src, "dicom", options={"key_file": str(key)})
    summary = run_index(src, tmp_path / "store", config, progress=False, model=tiny_model)
    assert summary.embedded == 3  # the non-UTF-8 name is stored as its keyed reference
    _check_accounting(tmp_path / "store", listing.listed, summary)
    mapped = {os.fsencode(p) for p in read_link_file(links).values()}
    assert os.fsencode(src) + b"/latin1-\xe9t\xe9.dcm" in mapped


def test_mixed_folder_is_refused_with_counts_or_read_as_asked(tmp_path: Path) -> None:
    from test_dicom_deid import write_dicom

    src = tmp_path / "src"
    write_dicom(src / "a.dcm", 1)
    write_dicom(src / "b.dcm", 2)
    _png(src / "c.png", 3)
    with pytest.raises(ConfigError, match=r"mixes 2 DICOM file\(s\) and 1 other image"):
        read_dataset(src)
    key = tmp_path / "key"
    key.write_text(KEY)
    as_dicom = list_source(src, "dicom", options={"key_file": str(key)})
    assert len(as_dicom.records) == 2 and [f.stage for f in as_dicom.failures] == ["not_dicom"]
    assert len(read_dataset(src, "folder")) == 3  # every file, each with its own decoder


@pytest.mark.slow
def test_duplicate_csv_rows_are_recorded(tmp_path: Path, tiny_model) -> None:
    src = tmp_path / "src"
    for i in range(2):
        _png(src / f"{i}.png", i)
    (src / "labels.csv").write_text("path,label\n0.png,0\n1.png,1\n0.png,0\n1.png,0\n")
    listing = list_source(src)
    assert len(listing.records) == 2
    assert [(f.stage, f.image_id) for f in listing.failures] == [
        ("duplicate", "0.png"),
        ("duplicate", "1.png"),
    ]
    assert "line 4" in listing.failures[0].reason and "line 2" in listing.failures[0].reason
    summary = run_index(
        src, tmp_path / "store", IndexConfig(device="cpu", workers=0), progress=False, model=tiny_model
    )
    assert (summary.already_stored, summary.embedded) == (0, 2)  # a new store stores what it lists
    _check_accounting(tmp_path / "store", listing.listed, summary)


def test_chestxray14_folder_records_fifos_and_undecodable_names(synth_cxr14: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "cxr14"
    shutil.copytree(synth_cxr14, root)
    images = next(p.parent for p in root.rglob("*.png"))
    os.mkfifo(images / "00099999_000.png")
    _png(Path(os.fsdecode(os.fsencode(images) + b"/\xff.png")), 1)
    errors: list = []
    records = read_dataset(root, errors=errors)
    assert len(records) == 40 and sorted(f.stage for f in errors) == ["file_name", "special_file"]
    assert all(f.image_id.encode("utf-8") and f.path.encode("utf-8") for f in errors)


def test_accounting_notices_a_lost_input() -> None:
    assert accounting(5, 2, {"decode": 1, "out_of_scope": 2}) == {
        "listed": 5,
        "stored": 2,
        "failed": 1,
        "skipped": {"out_of_scope": 2},
        "balanced": True,
    }
    assert not accounting(5, 2, {"decode": 1})["balanced"]
