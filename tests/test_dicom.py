"""DICOM: pixels (modality LUT, VOI window/LUT, MONOCHROME1, bit depths, compression) and de-identified records.

Privacy, scope, duplicates, the key and the listing cache: tests/test_dicom_deid.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

from cxr_embed.errors import ConfigError, DicomError
from cxr_embed.imageio import apply_window, read_image
from cxr_embed.readers import read_dataset
from cxr_embed.readers.deid import stretch

IDENTIFYING = {
    "PatientName": "DOE^JANE",
    "PatientBirthDate": "19510203",
    "AccessionNumber": "ACC99887766",
    "InstitutionName": "Saint Nobody Hospital",
    "ReferringPhysicianName": "HOUSE^GREGORY",
    "ImageComments": "patient very anxious, call her son",
    "StudyDescription": "CHEST PA secret-protocol",
}


def make_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    patient_id: str = "MRN-0001",
    study: tuple[str, str] = ("20200101", "1.2.3.1"),
    with_pixels: bool = True,
    compress: str | None = None,
    **tags: object,
) -> str:
    """Write a DX file with pydicom; returns its SOP Instance UID."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.PatientID, ds.PatientSex, ds.PatientAge, ds.ViewPosition = patient_id, "F", "063Y", "PA"
    ds.Modality = "DX"
    ds.StudyDate, ds.StudyInstanceUID = study
    for key, value in {**IDENTIFYING, **tags}.items():
        setattr(ds, key, value)
    if with_pixels:
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.astype("<u2").tobytes()
        if compress is not None:
            ds.compress(compress)
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


RAMP12 = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)


def gray(path: Path) -> np.ndarray:
    img = read_image(path)
    assert img.mode == "L"
    return np.asarray(img).astype(int)


def test_12bit_without_window_uses_the_full_range(tmp_path: Path) -> None:
    make_dicom(tmp_path / "a.dcm", RAMP12)
    out = gray(tmp_path / "a.dcm")
    assert out.min() == 0 and out.max() == 255
    assert np.array_equal(out, np.floor(RAMP12.astype(int) * 255 / 4095 + 0.5))


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    make_dicom(tmp_path / "m2.dcm", RAMP12)
    make_dicom(tmp_path / "m1.dcm", RAMP12, photometric="MONOCHROME1")
    assert np.array_equal(gray(tmp_path / "m1.dcm"), 255 - gray(tmp_path / "m2.dcm"))
    # DX files state the same inversion again as Presentation LUT Shape INVERSE: invert once only
    make_dicom(tmp_path / "m1i.dcm", RAMP12, photometric="MONOCHROME1", PresentationLUTShape="INVERSE")
    assert np.array_equal(gray(tmp_path / "m1i.dcm"), gray(tmp_path / "m1.dcm"))


def test_16bit_and_bits_stored(tmp_path: Path) -> None:
    values = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    make_dicom(tmp_path / "b16.dcm", values, bits_stored=16)
    out16 = gray(tmp_path / "b16.dcm")
    assert out16[0, 0] == 0 and out16[-1, -1] == 255 and np.all(np.diff(out16.ravel()) >= 0)
    # bits above Bits Stored (e.g. overlay bits) must not leak into the image
    dirty = RAMP12 | np.uint16(0xF000)
    make_dicom(tmp_path / "dirty.dcm", dirty, bits_stored=12)
    make_dicom(tmp_path / "clean.dcm", RAMP12, bits_stored=12)
    assert np.array_equal(gray(tmp_path / "dirty.dcm"), gray(tmp_path / "clean.dcm"))


def test_modality_lut_and_voi_window(tmp_path: Path) -> None:
    # stored s -> modality 2*s - 1000; window centre 1000 width 2001 covers modality 0..2000 = stored 500..1500
    make_dicom(
        tmp_path / "w.dcm",
        RAMP12,
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=1000.5,
        WindowWidth=2001,
    )
    out = gray(tmp_path / "w.dcm")
    stored = RAMP12.astype(int)
    assert np.all(out[stored <= 499] == 0) and np.all(out[stored >= 1501] == 255)
    mid = (stored > 520) & (stored < 1480)
    expected = np.floor(np.clip((2 * stored - 1000) / 2000, 0, 1) * 255 + 0.5)
    assert np.abs(out[mid] - expected[mid]).max() <= 1
    # multi-valued window: the first one is used
    make_dicom(tmp_path / "w2.dcm", RAMP12, WindowCenter=[2048, 100], WindowWidth=[4096, 50])
    assert gray(tmp_path / "w2.dcm").max() == 255 and np.mean(gray(tmp_path / "w2.dcm") == 255) < 0.01


def test_voi_lut_sequence(tmp_path: Path) -> None:
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = ((4095 - np.arange(4096)) * 10).astype("<u2").tobytes()  # inverting, outputs 0..40950 (OW)
    make_dicom(tmp_path / "lut.dcm", RAMP12, VOILUTSequence=Sequence([item]))
    out = gray(tmp_path / "lut.dcm")
    assert out[RAMP12 == 0].min() == 255 and out[RAMP12 == 4095].max() == 0


def test_sigmoid_and_linear_exact_windows() -> None:
    x = np.array([0.0, 100.0, 200.0])
    assert np.allclose(apply_window(x, 100, 200, "SIGMOID"), [1 / (1 + np.exp(2)), 0.5, 1 / (1 + np.exp(-2))])
    assert np.allclose(apply_window(x, 100, 200, "LINEAR_EXACT"), [0.0, 0.5, 1.0])


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_files_decode_like_uncompressed(tmp_path: Path, syntax: str) -> None:
    make_dicom(tmp_path / "raw.dcm", RAMP12)
    make_dicom(tmp_path / "c.dcm", RAMP12, compress=syntax)
    assert pydicom.dcmread(tmp_path / "c.dcm").file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(gray(tmp_path / "c.dcm"), gray(tmp_path / "raw.dcm"))


def test_file_without_pixel_data_is_rejected(tmp_path: Path) -> None:
    make_dicom(tmp_path / "sr.dcm", RAMP12, with_pixels=False)
    with pytest.raises(DicomError, match="no pixel data") as info:
        read_image(tmp_path / "sr.dcm")
    assert "sr.dcm" in str(info.value)
    make_dicom(tmp_path / "ok.dcm", RAMP12)
    errors: list = []
    records = read_dataset(tmp_path, errors=errors)
    assert [Path(r.path).name for r in records] == ["ok.dcm"]
    assert len(errors) == 1 and errors[0].stage == "dicom" and "no pixel data" in errors[0].reason
    with pytest.raises(DicomError, match="no pixel data"):
        read_dataset(tmp_path, "dicom")


KEY = "0123456789abcdef-test-key"


def test_records_carry_no_identifying_field(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    src = tmp_path / "src"
    src.mkdir()
    uid = make_dicom(src / "x.dcm", RAMP12)
    (record,) = read_dataset(src, key_file=key_file)
    key = stretch(KEY.encode(), "test")
    assert (
        record.image_id == key.uid(uid) and record.image_id.startswith("2.25.") and record.source == "dicom"
    )
    assert (record.sex, record.age, record.view, record.study, record.modality) == ("F", 63.0, "PA", 0, "DX")
    assert record.patient_id == key.patient("MRN-0001") and "MRN" not in record.patient_id
    assert record.stored_path == key.reference(b"x.dcm") and record.path == str(src / "x.dcm")
    stored = repr(dataclasses.astuple(dataclasses.replace(record, path="")))
    for value in [*IDENTIFYING.values(), "MRN-0001", "19510203", "1.2.3.1", "20200101", uid, "x.dcm"]:
        assert value not in stored
    other = tmp_path / "other-key"
    other.write_text("another-key-of-16-chars")
    assert read_dataset(src, key_file=other)[0].patient_id != record.patient_id


def test_key_from_environment_and_study_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dicom(tmp_path / "late.dcm", RAMP12, study=("20210505", "1.2.3.9"))
    make_dicom(tmp_path / "early.dcm", RAMP12, study=("20190101", "1.2.3.5"))
    make_dicom(tmp_path / "other.dcm", RAMP12, patient_id="MRN-0002", study=("20220101", "1.2.3.7"))
    monkeypatch.setenv("CXR_EMBED_ID_SALT", "env-key-0123456789")
    records = {Path(r.path).name: r for r in read_dataset(tmp_path)}
    assert (
        records["early.dcm"].study == 0 and records["late.dcm"].study == 1 and records["other.dcm"].study == 0
    )
    assert (
        records["early.dcm"].patient_id
        == records["late.dcm"].patient_id
        == stretch(b"env-key-0123456789", "env").patient("MRN-0001")
    )
    monkeypatch.setenv("CXR_EMBED_ID_SALT", "short")
    with pytest.raises(ConfigError, match="too short"):
        read_dataset(tmp_path)


def test_synthetic_dicom_layout_with_labels(tmp_path: Path) -> None:
    from cxr_embed.synth import generate

    generate(tmp_path, 6, layout="dicom", seed=3, size=64)
    errors: list = []
    records = read_dataset(tmp_path, errors=errors)
    assert errors == [] and len(records) == 6
    assert sum(r.label for r in records) == 3 and all(r.findings is not None for r in records)
    ds = pydicom.dcmread(records[0].path)
    assert (ds.BitsStored, ds.PhotometricInterpretation) == (12, "MONOCHROME2")
    assert all("SYN" not in (r.patient_id or "") for r in records)
