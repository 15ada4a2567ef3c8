"""One record type for an input image, and ``read_dataset`` which picks the right reader.

Every reader (ChestX-ray14, generic folder, DICOM) yields :class:`ImageRecord` so that indexing,
classification and retrieval never care where an image came from. Readers only *list* images and
their metadata; decoding pixels is :mod:`cxr_embed.imageio`'s job and happens later, per image.

Failures: with ``errors=None`` the first bad row/file raises a typed error (good for small, curated
inputs). Pass ``errors=[]`` for long jobs: each bad row/file is appended as a :class:`ReadFailure`
and skipped, so one corrupt file never stops a 100k-image index run.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_embed.errors import ConfigError, CxrEmbedError, InputError

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

DATASETS: tuple[str, ...] = ("auto", "chestxray14", "folder", "dicom")


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


@dataclass(frozen=True)
class ReadFailure:
    """A row or file a reader skipped, and why (``stage``: e.g. "csv", "missing", "unlisted", "dicom")."""

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


def read_dataset(
    source: str | Path, dataset: str = "auto", *, errors: list | None = None, **options: Any
) -> list[ImageRecord]:
    """List the images under ``source`` as records, using the reader for ``dataset``.

    ``dataset="auto"`` picks: ChestX-ray14 when a ``Data_Entry_2017*.csv`` is there (or ``source`` is
    one), DICOM when ``source`` is/contains DICOM files, else the generic folder reader.
    ``options`` go to the reader (see each reader's ``read`` docstring); unknown ones are refused.
    """
    root = Path(source).expanduser()
    if not root.exists():
        raise InputError(f"Dataset path {root} does not exist. Check the path.", str(root))
    if dataset not in DATASETS:
        raise ConfigError(f"Unknown dataset kind {dataset!r}; use one of {', '.join(DATASETS)}.")
    kind = detect_dataset(root) if dataset == "auto" else dataset
    reader = _reader(kind)
    accepted = set(inspect.signature(reader).parameters) - {"root", "errors"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(
            f"The {kind} reader has no option {', '.join(unknown)}; it takes {', '.join(sorted(accepted))}."
        )
    return reader(root.resolve(), errors=errors, **options)


def _reader(kind: str) -> Callable[..., list[ImageRecord]]:
    # Imported lazily: the DICOM reader pulls in pydicom, which CLI --help must not pay for.
    if kind == "chestxray14":
        from cxr_embed.readers import chestxray14

        return chestxray14.read
    if kind == "dicom":
        from cxr_embed.readers import dicom

        return dicom.read
    from cxr_embed.readers import folder

    return folder.read


def detect_dataset(root: Path) -> str:
    """Guess the layout of ``root``: "chestxray14", "dicom" or "folder"."""
    from cxr_embed.readers.chestxray14 import find_data_entry
    from cxr_embed.readers.dicom import is_dicom_file

    if root.is_file():
        if root.suffix.lower() == ".csv" and root.name.startswith("Data_Entry"):
            return "chestxray14"
        return "dicom" if is_dicom_file(root) else "folder"
    if find_data_entry(root) is not None:
        return "chestxray14"
    for path in iter_files(root, limit=50):
        if path.name != "DICOMDIR" and is_dicom_file(path):
            return "dicom"
    return "folder"


def iter_files(root: Path, limit: int | None = None):
    """Yield regular files under ``root`` recursively, sorted per directory, skipping hidden entries."""
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            yield Path(dirpath) / name
            count += 1
            if limit is not None and count >= limit:
                return
