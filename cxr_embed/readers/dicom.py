"""Hospital DICOM exports: listing (de-identified records) and decoding (pixels the model takes).

Pixels: the stored values go through the modality LUT (Rescale Slope/Intercept or a Modality LUT
Sequence), then the first VOI transform the file carries (VOI LUT Sequence, else Window
Center/Width with its VOI LUT Function), which is the rendering the modality chose for reading;
without one, a min-max window over the image's own range (as for 16-bit PNGs). MONOCHROME1 is
inverted so that bone is always bright. Bits Stored is honoured
by pydicom's decoders; compressed transfer syntaxes (JPEG, JPEG-LS, JPEG 2000, RLE) decode through
the pylibjpeg plugins. Colour DICOM becomes 8-bit RGB.

Privacy: a record carries only the SOP Instance UID (image id), a *salted hash* of Patient ID (raw
only when asked for), a study number ranked per patient from study date/time/UID, and Patient Sex,
Patient Age and View Position. Names, birth date, accession number, institution, physicians and
free text never leave this module. The salt comes from ``salt=`` or ``$CXR_EMBED_ID_SALT``; the
built-in default only pseudonymises against casual reading; set your own secret salt for real
de-identification (the same salt keeps ids stable across runs).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxr_embed.errors import DependencyError, DicomError, InputError
from cxr_embed.imageio import minmax_to_uint8
from cxr_embed.readers.chestxray14 import parse_age, parse_sex
from cxr_embed.readers.folder import LABEL_CSV, choose_columns, read_label_csv, record_from_row
from cxr_embed.records import FailureSink, ImageRecord, ReadFailure, iter_files

SALT_ENV = "CXR_EMBED_ID_SALT"
DEFAULT_SALT = "cxr-embed-default-salt"
DICOM_SUFFIXES = (".dcm", ".dicom")
PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Only these header fields are ever read into a record (besides ordering keys that are not stored).
HEADER_FIELDS = ("SOPInstanceUID", "PatientID", "StudyInstanceUID", "StudyDate", "StudyTime",
                 "PatientSex", "PatientAge", "ViewPosition")  # fmt: skip


def is_dicom_file(path: Path) -> bool:
    """True for a Part-10 file ("DICM" at byte 128) or a ``.dcm``/``.dicom`` file."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _pydicom():
    try:
        import pydicom
    except ImportError:  # pragma: no cover - declared dependency
        raise DependencyError("Reading DICOM needs pydicom: pip install pydicom pylibjpeg pylibjpeg-libjpeg "
                              "pylibjpeg-openjpeg") from None  # fmt: skip
    return pydicom


# --------------------------------------------------------------------------- pixels


def read_dicom_image(path: str | Path) -> Image.Image:
    """Decode a DICOM file to an 8-bit "L" (grayscale) or "RGB" image (see the module docstring)."""
    pydicom = _pydicom()
    p = Path(path)
    try:
        ds = pydicom.dcmread(p, force=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt headers
        raise DicomError(f"{p}: not a readable DICOM file ({type(exc).__name__}: {exc}).", str(p)) from None
    if not any(tag in ds for tag in PIXEL_TAGS):
        raise DicomError(
            f"{p}: DICOM file has no pixel data (SOP class {ds.get('SOPClassUID', 'unknown')}: e.g. a report, "
            "presentation state or key-object file). Remove it from the image folder.",
            str(p),
        )
    try:
        return dataset_to_image(ds)
    except DicomError as exc:
        raise DicomError(f"{p}: {exc}", str(p)) from None
    except Exception as exc:  # noqa: BLE001 - decoder boundary: a bad file must never crash a batch
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax) or "unknown transfer syntax"
        raise DicomError(
            f"{p}: cannot decode the pixel data ({name}; {type(exc).__name__}: {exc}). If it is a compressed "
            "syntax, install the pylibjpeg plugins (pylibjpeg-libjpeg, pylibjpeg-openjpeg) or pyjpegls.",
            str(p),
        ) from None


def dataset_to_image(ds: Any) -> Image.Image:
    """Pixels of a pydicom Dataset -> 8-bit PIL image (first frame of a multi-frame object)."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    arr = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        return Image.fromarray(minmax_to_uint8(apply_color_lut(arr, ds)), mode="RGB")
    if arr.ndim == 3:  # RGB / YBR (pydicom already converted YBR to RGB)
        rgb = arr if arr.dtype == np.uint8 else minmax_to_uint8(arr)
        return Image.fromarray(np.ascontiguousarray(rgb), mode="RGB")
    if arr.ndim != 2:
        raise DicomError(f"unexpected pixel array shape {arr.shape}.")
    values = apply_modality_lut(arr, ds) if "PixelData" in ds else arr
    gray = voi_to_uint8(np.asarray(values, dtype=np.float64), ds)
    # MONOCHROME1: low values are white. (DX files pair it with Presentation LUT Shape INVERSE, which
    # describes this same inversion, so that tag must not invert a second time.)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return Image.fromarray(gray, mode="L")


def voi_to_uint8(values: np.ndarray, ds: Any) -> np.ndarray:
    """Apply the file's first VOI LUT or window to modality values -> uint8; min-max when none."""
    from pydicom.pixels import apply_voi

    voi_seq = ds.get("VOILUTSequence")
    if voi_seq:
        lut = lut_values(voi_seq[0].LUTData)
        out = apply_voi(np.rint(values).astype(np.int64), ds, index=0)  # a LUT is indexed by integers
        lo, hi = float(lut.min()), float(lut.max())
        if hi > lo:
            return _unit_to_uint8((np.asarray(out, np.float64) - lo) / (hi - lo))
    window = first_window(ds)
    if window is not None:
        center, width, function = window
        return _unit_to_uint8(apply_window(values, center, width, function))
    return minmax_to_uint8(values)


def lut_values(data: Any) -> np.ndarray:
    """LUT Data as numbers: a US list, one value, or OW bytes (16-bit little-endian words)."""
    if isinstance(data, bytes):
        return np.frombuffer(data[: len(data) // 2 * 2], dtype="<u2").astype(np.float64)
    return np.asarray(data if _is_multi(data) else [data], dtype=np.float64)


def first_window(ds: Any) -> tuple[float, float, str] | None:
    """(center, width, function) of the first Window Center/Width pair, None when absent or width < 1."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        c = float(center[0] if _is_multi(center) else center)
        w = float(width[0] if _is_multi(width) else width)
    except (TypeError, ValueError, IndexError):
        return None
    if not np.isfinite(c) or not np.isfinite(w) or w < 1:
        return None
    return c, w, str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()


def _is_multi(value: Any) -> bool:
    return not isinstance(value, str | bytes | int | float) and hasattr(value, "__getitem__")


def apply_window(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 window to [0, 1] (LINEAR, LINEAR_EXACT, SIGMOID)."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width <= 1:
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _unit_to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.floor(np.clip(unit, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class _Header:
    path: Path
    sop_uid: str
    patient: str | None
    study_key: tuple[str, str, str]
    sex: str | None
    age: float | None
    view: str | None


def read(
    root: Path,
    *,
    errors: list | None = None,
    salt: str | None = None,
    raw_ids: bool = False,
    labels: str | Path | None = None,
) -> list[ImageRecord]:
    """De-identified records for every DICOM image under ``root`` (a folder or one file), sorted by path.

    ``salt``: secret for hashing Patient ID (default ``$CXR_EMBED_ID_SALT``); ``raw_ids=True`` keeps
    Patient ID as is. ``labels``: optional label CSV (default ``root/labels.csv`` when present; see
    the folder reader) whose path column holds paths relative to ``root`` and whose ``image_id``
    column, if any, holds SOP Instance UIDs; only label, findings and split are taken from it.
    Files without pixel data, unreadable headers and duplicated SOP Instance UIDs are reported.
    """
    sink = FailureSink(errors)
    files = (
        [root]
        if root.is_file()
        else [p for p in iter_files(root) if p.name != "DICOMDIR" and is_dicom_file(p)]
    )
    base = root.parent if root.is_file() else root
    key = (salt if salt is not None else os.environ.get(SALT_ENV, DEFAULT_SALT)).encode()
    headers: list[_Header] = []
    seen: dict[str, Path] = {}
    for path in files:
        try:
            header = read_header(path)
        except DicomError as exc:
            sink.report(ReadFailure(path.name, str(path), "dicom", str(exc)), exc)
            continue
        if header.sop_uid in seen:
            sink.report(
                ReadFailure(
                    header.sop_uid, str(path), "duplicate", f"same SOP Instance UID as {seen[header.sop_uid]}"
                ),
                InputError(f"{path} repeats the SOP Instance UID of {seen[header.sop_uid]}.", str(path)),
            )
            continue
        seen[header.sop_uid] = path
        headers.append(header)
    studies = _study_numbers(headers)
    if labels is None and (base / LABEL_CSV).is_file() and not root.is_file():
        labels = base / LABEL_CSV
    label_rows = _label_rows(labels, base, sink)
    records = []
    for h in headers:
        rel = h.path.relative_to(base).as_posix()
        record = ImageRecord(
            image_id=h.sop_uid,
            path=str(h.path.resolve()),
            patient_id=h.patient if raw_ids or h.patient is None else pseudonym(h.patient, key),
            study=studies[h.sop_uid],
            split=None,
            label=None,
            findings=None,
            sex=h.sex,
            age=h.age,
            view=h.view,
            source="dicom",
        )
        labelled = label_rows.get(h.sop_uid) or label_rows.get(rel)
        records.append(_with_labels(record, labelled) if labelled else record)
    return records


def read_header(path: Path) -> _Header:
    """The few non-identifying header fields of ``path`` (pixel data deferred, not decoded)."""
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(path, defer_size="64 KB", force=True)
        present = any(tag in ds for tag in PIXEL_TAGS)
        fields = {name: str(ds.get(name, "") or "").strip() for name in HEADER_FIELDS}
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt headers
        raise DicomError(
            f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc}).", str(path)
        ) from None
    if not present:
        raise DicomError(f"{path}: DICOM file has no pixel data (not an image); it is skipped.", str(path))
    if not fields["SOPInstanceUID"]:
        raise DicomError(
            f"{path}: DICOM file has no SOP Instance UID, so it cannot be identified.", str(path)
        )
    try:
        age = parse_age(fields["PatientAge"])
    except ValueError:
        age = None
    return _Header(
        path=path,
        sop_uid=fields["SOPInstanceUID"],
        patient=fields["PatientID"] or None,
        study_key=(fields["StudyDate"], fields["StudyTime"], fields["StudyInstanceUID"]),
        sex=parse_sex(fields["PatientSex"]),
        age=age,
        view=fields["ViewPosition"].upper() or None,
    )


def pseudonym(patient_id: str, key: bytes) -> str:
    """HMAC-SHA256 of the Patient ID under the salt, 16 hex digits: stable, not reversible without the salt."""
    return hmac.new(key, patient_id.encode(), hashlib.sha256).hexdigest()[:16]


def _study_numbers(headers: list[_Header]) -> dict[str, int | None]:
    """Per patient, studies ranked by (date, time, Study Instance UID) from 0, like ChestX-ray14 follow-ups."""
    by_patient: dict[str | None, set[tuple[str, str, str]]] = {}
    for h in headers:
        by_patient.setdefault(h.patient, set()).add(h.study_key)
    rank = {p: {k: i for i, k in enumerate(sorted(keys))} for p, keys in by_patient.items()}
    return {h.sop_uid: (rank[h.patient][h.study_key] if h.patient is not None else None) for h in headers}


def _label_rows(labels: str | Path | None, base: Path, sink: FailureSink) -> dict[str, ImageRecord]:
    """Label CSV rows as partial records keyed by SOP UID (image_id column) and by relative path."""
    if labels is None:
        return {}
    csv_path = Path(labels)
    table, header = read_label_csv(csv_path)
    columns = choose_columns(header, str(csv_path), image_id="image_id" if "image_id" in header else None)
    keyed: dict[str, ImageRecord] = {}
    for line_no, row in table:
        rel = Path(row[columns.path].strip()).as_posix()
        image_id = row[columns.image_id].strip() if columns.image_id else rel
        try:
            partial = record_from_row(row, columns, image_id, str(base / rel), "dicom")
        except ValueError as exc:
            sink.report(ReadFailure(image_id, rel, "csv", f"line {line_no}: {exc}"),
                        InputError(f"{csv_path} line {line_no}: {exc}.", str(csv_path)))  # fmt: skip
            continue
        keyed[image_id] = keyed[rel] = partial
    return keyed


def _with_labels(record: ImageRecord, labelled: ImageRecord) -> ImageRecord:
    """Take label, findings and split from the CSV; identity fields stay the header's."""
    return replace(record, label=labelled.label, findings=labelled.findings, split=labelled.split)
