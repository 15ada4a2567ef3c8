"""DICOM privacy and scope (issue 13): no identifier in any byte of the store, chest radiographs only,
the key, duplicates, the listing cache, and the CLI reaching every reader option."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from cxr_embed_cli.main import app
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from typer.testing import CliRunner

from cxr_embed.errors import ConfigError, StoreIdentityError
from cxr_embed.job import IndexConfig, run_index
from cxr_embed.listing import accounting, list_source, read_link_file
from cxr_embed.model import tiny_model_dir
from cxr_embed.readers import read_dataset
from cxr_embed.readers.deid import stretch
from cxr_embed.store import Store

runner = CliRunner()
KEY = "canary-test-key-0123456789abcdef"
UID_ROOT = "1.2.999.77654033.20040826"  # a UID root carrying a Patient ID and a date, as real ones do
CANARIES = [b"CANARY", b"canary", b"Canary", b"77654033", b"20040826", b"19010203", b"19020304", b"19030405",
            b"081516"]  # fmt: skip
IDENTIFYING = {
    "PatientName": "CANARY^PATIENT", "PatientID": "CANARY-77654033", "IssuerOfPatientID": "CANARY-ISSUER",
    "OtherPatientIDs": "CANARY-OTHER", "PatientBirthDate": "19010203", "StudyDate": "19020304",
    "SeriesDate": "19020304", "AcquisitionDate": "19030405", "ContentDate": "19030405", "StudyTime": "081516",
    "AccessionNumber": "CANARYACC", "InstitutionName": "CANARY Hospital", "InstitutionAddress": "1 CANARY Road",
    "ReferringPhysicianName": "CANARY^REFERRER", "OperatorsName": "CANARY^OPERATOR", "StationName": "CANARYSTN",
    "DeviceSerialNumber": "CANARYSERIAL", "StudyID": "CANARYSTUDY", "ImageComments": "CANARY free text",
    "StudyDescription": "CANARY CHEST PA", "SeriesDescription": "CANARY series",
}  # fmt: skip


def write_dicom(
    path: Path,
    n: int,
    *,
    modality: str = "DX",
    frames: int = 1,
    patient: str = "CANARY-77654033",
    sop: str | None = None,
    burned_in: str | None = None,
    body_part: str | None = "CHEST",
    pixels: bytes | None = None,
) -> str:
    """A small 12-bit DICOM whose every identifying attribute carries a canary; returns its SOP UID."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    sop = sop or f"{UID_ROOT}.{n}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = f"{UID_ROOT}.100.{n}", f"{UID_ROOT}.200.{n}"
    for name, value in {**IDENTIFYING, "PatientID": patient}.items():
        setattr(ds, name, value)
    ds.Modality, ds.PatientSex, ds.PatientAge, ds.ViewPosition = modality, "F", "063Y", "PA"
    ds.Manufacturer, ds.ManufacturerModelName, ds.PixelSpacing = "Acme", "X1", [0.14, 0.15]
    if body_part:
        ds.BodyPartExamined = body_part
    if burned_in:
        ds.BurnedInAnnotation = burned_in
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ramp = ((np.arange(32 * 32 * frames) * (n + 3)) % 4096).astype("<u2").tobytes()
    ds.PixelData = ramp if pixels is None else pixels
    ds.save_as(path, enforce_file_format=True)
    return sop


def canary_corpus(root: Path) -> dict[str, Path]:
    """3 chest DX (2 patients) + CT + MR + multi-frame + burned-in + undecodable, in canary folders."""
    folder = root / "CANARY-77654033" / "19020304_CANARYACC"
    files = {f"chest{i}": folder / f"CANARY_{i}.dcm" for i in range(3)}
    for i, path in enumerate(files.values()):
        write_dicom(path, i, patient="CANARY-77654033" if i < 2 else "CANARY-OTHER-PATIENT")
    files["ct"], files["mr"] = folder / "CANARY_ct.dcm", folder / "CANARY_mr.dcm"
    write_dicom(files["ct"], 10, modality="CT")
    write_dicom(files["mr"], 11, modality="MR")
    files["multi"], files["burned"] = folder / "CANARY_multi.dcm", folder / "CANARY_burned.dcm"
    write_dicom(files["multi"], 12, frames=2)
    write_dicom(files["burned"], 13, burned_in="YES")
    files["broken"] = folder / "CANARY_broken.dcm"  # in scope, but its pixels do not decode
    write_dicom(files["broken"], 14, pixels=b"\x00\x01" * 10)
    return files


def assert_no_canary(store: Path) -> None:
    """No canary in any byte of any file under ``store``, nor in any decompressed Parquet value."""
    files = [p for p in store.rglob("*") if p.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        for canary in CANARIES:
            assert canary not in data, f"{canary!r} in {path.relative_to(store)}"
        if path.suffix == ".parquet":
            text = json.dumps(pq.read_table(path).to_pylist(), default=str).encode()
            for canary in CANARIES:
                assert canary not in text, f"{canary!r} in the values of {path.relative_to(store)}"


@pytest.mark.slow
def test_phi_canary_end_to_end_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, store, links = tmp_path / "src", tmp_path / "store", tmp_path / "links.csv"
    files = canary_corpus(src)
    config_home = tmp_path / "config"
    env = {"CXR_EMBED_MODEL_DIR": str(tiny_model_dir()), "XDG_CONFIG_HOME": str(config_home)}
    args = [
        "index",
        str(src),
        "--store",
        str(store),
        "--device",
        "cpu",
        "--workers",
        "0",
        "--link-file",
        str(links),
    ]
    first = runner.invoke(app, [*args, "--json"], env=env)
    assert first.exit_code == 2, first.output  # partial: one file fails to decode; out-of-scope ones are skipped
    summary = json.loads(first.stdout)
    assert (summary["failed"], summary["skipped"], summary["balanced"]) == (1, {"out_of_scope": 4}, True)
    key_file = config_home / "cxr-embed" / "id-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert first.stderr.count(str(key_file)) == 1  # the new key's path, printed once

    opened = Store.open(store)
    meta = opened.metadata().to_pylist()
    assert summary["embedded"] == len(opened) == 3 and {r["modality"] for r in meta} == {"DX"}
    assert all(r["image_id"].startswith("2.25.") and r["path"].startswith("ref-") for r in meta)
    assert {r["body_part"] for r in meta} == {"CHEST"} and {r["frames"] for r in meta} == {1}
    assert len({r["patient_id"] for r in meta}) == 2
    errors = opened.errors().to_pylist()
    assert (
        sorted(e["stage"] for e in errors) == ["decode"] + ["out_of_scope"] * 4
    )  # decode: named by reference
    assert len(opened) + len(errors) == len(files)  # listed = stored + failed + skipped
    balance = accounting(
        len(files), summary["already_stored"] + summary["embedded"], summary["failures_by_stage"]
    )
    assert balance["balanced"] and balance["skipped"] == {"out_of_scope": 4} and balance["failed"] == 1
    assert {p.resolve() for p in read_link_file(links).values()} == {p.resolve() for p in files.values()}
    assert stat.S_IMODE(links.stat().st_mode) == 0o600
    assert json.loads((store / "store.json").read_text())["identity"]["id_key_fingerprint"]
    assert_no_canary(store)
    # only the data owner's link file turns the stored references back into files, at display time
    query = ["search", "--store", str(store), "--id", meta[0]["image_id"], "-k", "2", "--format", "csv"]
    shown = runner.invoke(app, [*query, "--link-file", str(links)])
    assert shown.exit_code == 0, shown.output
    shown_paths = {row["path"] for row in csv.DictReader(io.StringIO(shown.stdout))}
    assert shown_paths and shown_paths <= {str(p) for p in read_link_file(links).values()}
    hidden = runner.invoke(app, query)
    assert all(row["path"].startswith("ref-") for row in csv.DictReader(io.StringIO(hidden.stdout)))
    assert_no_canary(store)

    again = runner.invoke(app, args, env=env)  # resume: nothing new, the key file is not announced again
    assert again.exit_code == 2, again.output  # the undecodable file is retried and fails again
    assert str(key_file) not in again.stderr
    other = tmp_path / "other.key"
    other.write_text("a-different-key-0123456789")
    refused = runner.invoke(app, [*args, "--key-file", str(other)], env=env)
    assert (
        refused.exit_code == 1
        and "de-identification key" in refused.stderr
        and "Traceback" not in refused.output
    )
    assert_no_canary(store)


@pytest.mark.slow
def test_resume_with_another_key_is_refused(tmp_path: Path, tiny_model) -> None:
    src = tmp_path / "src"
    write_dicom(src / "a.dcm", 1)
    keys = [tmp_path / "k1", tmp_path / "k2"]
    keys[0].write_text(KEY)
    keys[1].write_text(KEY + "-other")

    def index(key: Path):
        config = IndexConfig(device="cpu", workers=0, reader_options={"key_file": str(key)})
        return run_index(src, tmp_path / "store", config, progress=False, model=tiny_model)

    assert index(keys[0]).embedded == 1
    with pytest.raises(StoreIdentityError, match="de-identification key"):
        index(keys[1])
    assert index(keys[0]).already_stored == 1


def _key_file(tmp_path: Path) -> Path:
    path = tmp_path / "key"
    path.write_text(KEY)
    return path


def test_scope_rules_and_their_options(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_dicom(src / "chest.dcm", 1)
    write_dicom(src / "ct.dcm", 2, modality="CT")
    write_dicom(src / "knee.dcm", 3, body_part="KNEE")
    write_dicom(src / "nobody.dcm", 4, body_part=None)
    write_dicom(src / "burned.dcm", 5, burned_in="YES")
    write_dicom(src / "multi.dcm", 6, frames=3)
    key = _key_file(tmp_path)

    def listing(**options):
        out = list_source(src, "dicom", options={"key_file": key, **options})
        return sorted(r.stored_path for r in out.records), {f.path: f for f in out.failures}

    k = stretch(KEY.encode(), "test")
    ref = {
        name: k.reference(f"{name}.dcm".encode())
        for name in ("chest", "ct", "knee", "nobody", "burned", "multi")
    }
    kept, failed = listing()
    assert kept == sorted([ref["chest"], ref["nobody"]])
    assert {failed[ref[n]].stage for n in ("ct", "knee", "burned", "multi")} == {"out_of_scope"}
    assert "--modality" in failed[ref["ct"]].reason and "--allow-burned-in" in failed[ref["burned"]].reason
    assert "--frames" in failed[ref["multi"]].reason and "--body-part" in failed[ref["knee"]].reason
    assert ref["ct"] in listing(modality=["dx", "CT"])[0]
    assert ref["knee"] in listing(body_part=["any"])[0]
    assert ref["burned"] in listing(allow_burned_in=True)[0]
    assert ref["multi"] in listing(frames="first")[0]
    every = list_source(src, "dicom", options={"key_file": key, "frames": "all"}).records
    frames = [r for r in every if r.stored_path.startswith(ref["multi"])]
    assert [r.frame for r in frames] == [0, 1, 2] and len({r.image_id for r in frames}) == 3
    from cxr_embed.imageio import read_image

    images = [np.asarray(read_image(r.path, r.frame)) for r in frames]
    assert not np.array_equal(images[0], images[1])  # each record decodes its own frame


def test_duplicate_uid_keeps_the_copy_that_decodes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    uid = write_dicom(src / "a_broken.dcm", 1, pixels=b"\x00\x01" * 10)  # too short: does not decode
    write_dicom(src / "b_good.dcm", 1, sop=uid)
    write_dicom(src / "c_copy.dcm", 1, sop=uid)
    out = list_source(src, "dicom", options={"key_file": _key_file(tmp_path)})
    k = stretch(KEY.encode(), "test")
    (record,) = out.records
    assert record.stored_path == k.reference(b"b_good.dcm") and record.image_id == k.uid(uid)
    dupes = {f.path: f for f in out.failures}
    assert set(dupes) == {k.reference(b"a_broken.dcm"), k.reference(b"c_copy.dcm")}
    assert all(f.stage == "duplicate" and f.image_id == record.image_id for f in dupes.values())
    assert all(record.stored_path in f.reason for f in dupes.values())


def test_listing_cache_rereads_only_new_or_changed_files(tmp_path: Path) -> None:
    src, cache = tmp_path / "src", tmp_path / "store" / "cache"
    for i in range(4):
        write_dicom(src / f"{i}.dcm", i)
    options = {"key_file": str(_key_file(tmp_path))}
    first = list_source(src, "dicom", options=options, cache_dir=cache)
    assert (first.headers_read, first.headers_cached) == (4, 0)
    second = list_source(src, "dicom", options=options, cache_dir=cache)
    assert (second.headers_read, second.headers_cached) == (0, 4) and second.records == first.records
    write_dicom(src / "4.dcm", 4)  # new
    write_dicom(src / "0.dcm", 7)  # changed (another image in the same file)
    os.utime(src / "0.dcm", ns=(1, 1))
    third = list_source(src, "dicom", options=options, cache_dir=cache)
    assert (third.headers_read, third.headers_cached) == (2, 3) and len(third.records) == 5
    other = tmp_path / "other"
    other.write_text(KEY + "-other")
    assert list_source(src, "dicom", options={"key_file": str(other)}, cache_dir=cache).headers_read == 5
    assert_no_canary(cache)


def test_key_file_is_created_once_user_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    write_dicom(tmp_path / "src" / "a.dcm", 1)
    first = read_dataset(tmp_path / "src")
    key_file = tmp_path / "cfg" / "cxr-embed" / "id-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and len(key_file.read_text().strip()) == 64
    assert capsys.readouterr().err.count(str(key_file)) == 1
    assert read_dataset(tmp_path / "src") == first and str(key_file) not in capsys.readouterr().err
    with pytest.raises(ConfigError, match="does not exist"):
        read_dataset(tmp_path / "src", key_file=tmp_path / "nope")


def test_store_writer_keeps_the_source_identity(tmp_path: Path) -> None:
    from cxr_embed.store import StoreWriter

    def writer(identity: dict[str, str] | None) -> StoreWriter:
        return StoreWriter(tmp_path / "store", model_id="m", checkpoint_sha256="c", preprocess_fingerprint="p",
                           dim=4, identity=identity)  # fmt: skip

    with writer({"id_key_fingerprint": "aaaa"}):
        pass
    assert json.loads((tmp_path / "store" / "store.json").read_text())["identity"] == {
        "id_key_fingerprint": "aaaa"
    }
    with writer({"id_key_fingerprint": "aaaa"}):
        pass  # the same key resumes
    for other in ({"id_key_fingerprint": "bbbb"}, None):
        with pytest.raises(StoreIdentityError, match="aaaa"):
            writer(other).open()
