"""Readers list a dataset's images as :class:`cxr_embed.records.ImageRecord`; ``read_dataset`` picks one.

One module per layout: ``chestxray14`` (NIH distribution), ``folder`` (PNG/JPEG folders with a label
CSV or label sub-folders) and ``dicom`` (hospital exports, de-identified on the way in), plus
``walk`` (a folder walk that never crashes or hangs on odd entries). Readers never decode pixels:
that is :mod:`cxr_embed.imageio`, which imports no reader.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cxr_embed.errors import ConfigError, InputError
from cxr_embed.readers.walk import walk
from cxr_embed.records import ImageRecord

DATASETS: tuple[str, ...] = ("auto", "chestxray14", "folder", "dicom")
# Non-DICOM image suffixes: a folder holding these and DICOM files is "mixed" (see detect_dataset).
PLAIN_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")


def read_dataset(
    source: str | Path, dataset: str = "auto", *, errors: list | None = None, **options: Any
) -> list[ImageRecord]:
    """List the images under ``source`` as records, using the reader for ``dataset``.

    ``dataset="auto"`` picks: ChestX-ray14 when a ``Data_Entry_2017*.csv`` is there (or ``source`` is
    one), DICOM when ``source`` is/contains DICOM files, else the generic folder reader.
    ``options`` go to the reader (see each reader's ``read`` docstring); unknown ones are refused.
    """
    root, kind = resolve_source(source, dataset, options)
    return reader_for(kind)(root, errors=errors, **options)


def resolve_source(source: str | Path, dataset: str, options: dict[str, Any]) -> tuple[Path, str]:
    """(resolved root, reader kind) after checking the path, the kind and the reader's options."""
    root = Path(source).expanduser()
    if not root.exists():
        raise InputError(f"Dataset path {root} does not exist. Check the path.", str(root))
    if dataset not in DATASETS:
        raise ConfigError(f"Unknown dataset kind {dataset!r}; use one of {', '.join(DATASETS)}.")
    kind = detect_dataset(root) if dataset == "auto" else dataset
    accepted = set(inspect.signature(reader_for(kind)).parameters) - {"root", "errors"}
    unknown = sorted(set(options) - accepted)
    if unknown:

        def flag(name: str) -> str:
            return "--" + name.replace("_", "-")

        raise ConfigError(
            f"The {kind} reader has no option {', '.join(map(flag, unknown))} (it takes "
            f"{', '.join(map(flag, sorted(accepted)))}); leave it out, or choose another --dataset."
        )
    return root.resolve(), kind


def reader_for(kind: str) -> Callable[..., list[ImageRecord]]:
    """The ``read`` function of a layout (imported lazily: pydicom must not slow down CLI --help)."""
    if kind == "chestxray14":
        from cxr_embed.readers import chestxray14

        return chestxray14.read
    if kind == "dicom":
        from cxr_embed.readers import dicom

        return dicom.read
    from cxr_embed.readers import folder

    return folder.read


def detect_dataset(root: Path) -> str:
    """Guess the layout of ``root``: "chestxray14", "dicom" or "folder".

    A folder holding both DICOM files and other images is refused with the count of each, rather
    than guessed: the DICOM reader would leave the PNGs out and the folder reader would store the
    DICOMs' paths un-pseudonymised, so the user must choose (or split the folder).
    """
    from cxr_embed.imageio import is_dicom_file
    from cxr_embed.readers.chestxray14 import find_data_entry

    if root.is_file():
        if root.suffix.lower() == ".csv" and root.name.startswith("Data_Entry"):
            return "chestxray14"
        return "dicom" if is_dicom_file(root) else "folder"
    if find_data_entry(root) is not None:
        return "chestxray14"
    files = [p for p in walk(root).files if p.name != "DICOMDIR"]
    plain = sum(p.suffix.lower() in PLAIN_IMAGE_SUFFIXES for p in files)
    dicom = sum(p.suffix.lower() not in PLAIN_IMAGE_SUFFIXES and is_dicom_file(p) for p in files)
    if dicom and plain:
        raise ConfigError(
            f"{root} mixes {dicom} DICOM file(s) and {plain} other image file(s) (PNG/JPEG/…). Choose one: "
            "--dataset dicom indexes the DICOM files (de-identified) and records the others as not_dicom; "
            "--dataset folder indexes every file as an image with paths kept as they are; or split the folder."
        )
    return "dicom" if dicom else "folder"
