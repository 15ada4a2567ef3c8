"""The record types every reader yields, and the small value parsers readers share.

Every reader (ChestX-ray14, generic folder, DICOM) yields :class:`ImageRecord` so that indexing,
classification and retrieval never care where an image came from. Readers only *list* images and
their metadata; decoding pixels is :mod:`cxr_embed.imageio`'s job and happens later, per image.

This module imports no reader and no decoder: data flows readers → records and readers →
:mod:`cxr_embed.imageio`, never back (``cxr_embed.readers.read_dataset`` picks the reader).

Failures: with ``errors=None`` the first bad row/file raises a typed error (good for small, curated
inputs). Pass ``errors=[]`` for long jobs: each bad row/file is appended as a :class:`ReadFailure`
and skipped, so one corrupt file never stops a 100k-image index run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cxr_embed.errors import CxrEmbedError

FINDINGS: tuple[str, ...] = (
    "atelectasis",
    "cardiomegaly",
    "effusion",
    "infiltration",
    "mass",
    "nodule",
    "pneumonia",
    "pneumothorax",
    "consolidation",
    "edema",
    "emphysema",
    "fibrosis",
    "pleural_thickening",
    "hernia",
)


@dataclass(frozen=True)
class ImageRecord:
    """One input image and what is known about it (None = unknown)."""

    image_id: str  # unique within a dataset (ChestX-ray14: file name; DICOM: SOP Instance UID)
    path: str  # absolute path (or URI) of the image file
    patient_id: str | None
    study: int | None  # follow-up number / study index
    split: str | None  # "train" | "test" | None  (official lists; train_val -> "train")
    label: int | None  # 1 = abnormal (any finding), 0 = normal ("No Finding"), None = unknown
    findings: tuple[int, ...] | None  # 14 flags in FINDINGS order, or None when unknown
    sex: str | None  # "M" | "F" | None
    age: float | None
    view: str | None  # "PA" | "AP" | "LL" | …
    source: str  # "chestxray14" | "folder" | "dicom" | "synth"
    # What the store keeps in its ``path`` column when ``path`` itself must not be stored (DICOM: a
    # keyed reference; the data owner's link file maps it back to ``path``). None: store ``path``.
    stored_path: str | None = None
    # Non-identifying acquisition attributes (DICOM headers; CSV columns where a dataset has them).
    modality: str | None = None  # "CR" | "DX" | …
    body_part: str | None = None  # BodyPartExamined, upper case
    photometric: str | None = None  # "MONOCHROME1" | "MONOCHROME2" | "RGB" | …
    bits_stored: int | None = None
    rows: int | None = None
    columns: int | None = None
    pixel_spacing_row: float | None = None  # mm
    pixel_spacing_col: float | None = None  # mm
    manufacturer: str | None = None
    model_name: str | None = None  # ManufacturerModelName
    frames: int | None = None  # NumberOfFrames (1 for single-frame images)
    # Which frame of a multi-frame file this record is (None: the file's only or first frame). Not a
    # store column: it tells the decoder what to read (``--frames all`` lists one record per frame).
    frame: int | None = None


@dataclass(frozen=True)
class ReadFailure:
    """A row or file a reader skipped, and why.

    ``stage`` names the kind: "csv", "missing", "unlisted", "duplicate", "dicom", "out_of_scope",
    "not_dicom", "symlink", "special_file", "file_name", "unreadable". For DICOM sources ``image_id``
    and ``path`` are pseudonymous (keyed id / keyed reference) and ``reason`` names no file.
    """

    image_id: str
    path: str
    stage: str
    reason: str


class FailureSink:
    """Collects reader failures into a list, or raises them when no list was given (strict mode)."""

    def __init__(self, errors: list | None):
        self.errors = errors

    def report(self, failure: ReadFailure, error: CxrEmbedError) -> None:
        """Record ``failure`` (lenient mode) or raise ``error`` (strict mode)."""
        if self.errors is None:
            raise error
        self.errors.append(failure)


NORMAL_NAMES = {"0", "normal", "negative", "no finding", "no_finding", "nofinding", "false", "no"}
ABNORMAL_NAMES = {"1", "abnormal", "positive", "finding", "true", "yes"}


def parse_label(text: str) -> int | None:
    """Label text to 0/1: abnormal, 1, positive -> 1; normal, 0, No Finding -> 0; else ValueError."""
    value = text.strip().lower()
    if value in NORMAL_NAMES:
        return 0
    if value in ABNORMAL_NAMES:
        return 1
    raise ValueError(f"label {text!r} is neither normal (0) nor abnormal (1)")


def parse_sex(text: str) -> str | None:
    """ "M"/"F" (any case); anything else (O, blank, unknown) is None."""
    text = text.upper()
    return text if text in ("M", "F") else None


def parse_age(text: str) -> float | None:
    """Ages appear as ``58`` (CSV) or ``058Y`` / ``006M`` (DICOM Age String, early ChestX-ray14)."""
    if not text:
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([YMWD]?)", text.upper())
    if match is None:
        raise ValueError(f"Patient Age {text!r} is not a number")
    return float(match.group(1)) / {"": 1, "Y": 1, "M": 12, "W": 52.1775, "D": 365.25}[match.group(2)]
