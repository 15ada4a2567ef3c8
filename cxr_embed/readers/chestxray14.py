"""NIH ChestX-ray14 as distributed: ``Data_Entry_2017_v2020.csv`` (or ``Data_Entry_2017.csv``), the
official patient-wise split lists, and PNGs in ``images_001/images/`` … or one ``images/`` folder.

Two quirks of the CSV make generic CSV readers go wrong: the header fields
``OriginalImage[Width,Height]`` and ``OriginalImagePixelSpacing[x,y]`` contain unquoted commas (each
is two data columns), and the older file ends every line with a trailing comma. The header is
therefore expanded bracket-group-wise so that header and data columns line up exactly.

Labels follow the study this project reproduces: "No Finding" is Normal (0), any of the 14 findings
is Abnormal (1). The official ``train_val_list.txt`` maps to split "train", ``test_list.txt`` to
"test"; a patient on both sides is refused, because it would leak into every test metric.
"""

from __future__ import annotations

import csv
import functools
import io
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cxr_embed.errors import ConfigError, CsvFormatError, InputError
from cxr_embed.readers.walk import display_name, utf8_name
from cxr_embed.records import FINDINGS, FailureSink, ImageRecord, ReadFailure, parse_age, parse_sex

DATA_ENTRY_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
SPLIT_FILES = {"train": "train_val_list.txt", "test": "test_list.txt"}
NO_FINDING = "No Finding"
# The CSV spelling of each finding, in FINDINGS order ("Pleural_Thickening" keeps its underscore).
CSV_FINDING_NAMES: tuple[str, ...] = tuple(
    "_".join(part.capitalize() for part in name.split("_")) for name in FINDINGS
)
DATA_ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Sex,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
IMAGE_SUFFIXES = (".png",)

_FINDING_INDEX = {re.sub(r"[ _]", "", name.lower()): i for i, name in enumerate(FINDINGS)}
_COLUMNS = {
    "image": ("Image Index",),
    "labels": ("Finding Labels",),
    "followup": ("Follow-up #",),
    "patient": ("Patient ID",),
    "age": ("Patient Age",),
    "sex": ("Patient Sex", "Patient Gender"),
    "view": ("View Position",),
}


def find_data_entry(root: Path) -> Path | None:
    """The Data_Entry CSV in ``root`` (the v2020 file wins over the 2017 one), or None."""
    for name in DATA_ENTRY_NAMES:
        if (root / name).is_file():
            return root / name
    return None


def read(
    root: Path,
    *,
    errors: list | None = None,
    csv_path: str | Path | None = None,
    images_dir: str | Path | None = None,
    splits: bool = True,
    skip_missing: bool = False,
) -> list[ImageRecord]:
    """Records for every CSV row whose image exists, in CSV order.

    ``root``: the dataset folder (or the Data_Entry CSV itself). ``csv_path``: another Data_Entry
    file. ``images_dir``: where the PNGs are when not under ``root``. ``splits=False`` ignores the
    official split lists. Rows with an image not on disk are reported (stage "missing"; dropped
    silently with ``skip_missing=True``, for a partial download such as ``images_001`` only), so are
    PNGs on disk that no row lists (stage "unlisted"), and malformed rows (stage "csv").
    """
    sink = FailureSink(errors)
    if root.is_file():
        csv_file, root = root, root.parent
    else:
        csv_file = Path(csv_path) if csv_path is not None else find_data_entry(root)
    if csv_file is None or not csv_file.is_file():
        raise InputError(
            f"No Data_Entry_2017_v2020.csv or Data_Entry_2017.csv in {root}. Point to the ChestX-ray14 "
            "folder that holds it, or pass the CSV path.",
            str(root),
        )
    rows = parse_data_entry(read_text(csv_file), source=str(csv_file), sink=sink)
    split_of = read_split_lists(root) if splits else {}
    images = index_images(Path(images_dir) if images_dir is not None else root, sink)

    records: list[ImageRecord] = []
    listed: set[str] = set()
    for row in rows:
        image_id = row["image_id"]
        listed.add(image_id)
        path = images.get(image_id)
        if path is None and skip_missing:
            continue
        if path is None:
            sink.report(
                ReadFailure(
                    image_id, str(root / image_id), "missing", "listed in the CSV but no such PNG on disk"
                ),
                InputError(f"{image_id} is listed in {csv_file.name} but not found under {root}.", image_id),
            )
            continue
        records.append(
            ImageRecord(
                image_id=image_id,
                path=str(path),
                patient_id=row["patient_id"],
                study=row["study"],
                split=split_of.get(image_id),
                label=row["label"],
                findings=row["findings"],
                sex=row["sex"],
                age=row["age"],
                view=row["view"],
                source="chestxray14",
            )
        )
    for image_id in sorted(set(images) - listed):
        sink.report(
            ReadFailure(image_id, str(images[image_id]), "unlisted", "PNG on disk but not listed in the CSV"),
            InputError(
                f"{images[image_id]} is not listed in {csv_file.name}; it has no labels.",
                str(images[image_id]),
            ),
        )
    check_patient_splits(records)
    return records


def read_text(path: Path) -> str:
    """File contents as text; undecodable or unreadable files become a CsvFormatError."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CsvFormatError(f"{path} is not a UTF-8 text file ({exc.reason}).", str(path)) from None
    except OSError as exc:
        raise InputError(f"Cannot read {path}: {exc.strerror or exc}.", str(path)) from None


def expand_header(fields: Sequence[str]) -> list[str]:
    """Re-join bracket groups split by the CSV reader and expand each to one name per data column.

    ``["OriginalImage[Width", "Height]"]`` -> ``["OriginalImage[Width]", "OriginalImage[Height]"]``.
    """
    names: list[str] = []
    i = 0
    while i < len(fields):
        field = fields[i].strip()
        if "[" in field and "]" not in field:
            group = [field]
            while i + 1 < len(fields) and "]" not in group[-1]:
                i += 1
                group.append(fields[i].strip())
            joined = ",".join(group)
            base, _, inner = joined.partition("[")
            names.extend(f"{base}[{part.strip()}]" for part in inner.rstrip("]").split(","))
        else:
            names.append(field)
        i += 1
    return names


def parse_data_entry(
    text: str, *, source: str = "<csv>", sink: FailureSink | None = None
) -> list[dict[str, Any]]:
    """Parse a Data_Entry CSV into row dicts (image_id, patient_id, study, label, findings, sex, age, view).

    Structural problems (no header, required column missing) raise CsvFormatError; a bad row is
    reported to ``sink`` (stage "csv") and skipped. Duplicated image ids are bad rows too.
    """
    sink = sink or FailureSink(None)
    try:
        table = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise CsvFormatError(f"{source} is not a readable CSV: {exc}.", source) from None
    if not table or not any(f.strip() for f in table[0]):
        raise CsvFormatError(f"{source} is empty; expected a ChestX-ray14 Data_Entry header.", source)
    header = expand_header(table[0])
    while header and header[-1] == "":  # the 2017 file's trailing comma
        header.pop()
    col = _locate_columns(header, source)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for line_no, fields in enumerate(table[1:], start=2):
        if not any(f.strip() for f in fields):
            continue
        image_id = fields[col["image"]].strip() if len(fields) > col["image"] else f"<line {line_no}>"
        try:
            row = _parse_row(fields, header, col)
            if row["image_id"] in seen:
                raise ValueError("this image is listed twice")
        except ValueError as exc:
            sink.report(
                ReadFailure(image_id, image_id, "csv", f"line {line_no}: {exc}"),
                CsvFormatError(
                    f"{source} line {line_no} ({image_id}): {exc}. Fix or remove that row.", source
                ),
            )
            continue
        seen.add(row["image_id"])
        rows.append(row)
    return rows


def _locate_columns(header: list[str], source: str) -> dict[str, int]:
    found: dict[str, int] = {}
    for key, names in _COLUMNS.items():
        for name in names:
            if name in header:
                found[key] = header.index(name)
                break
    missing = [_COLUMNS[k][0] for k in ("image", "labels", "patient") if k not in found]
    if missing:
        raise CsvFormatError(
            f"{source} lacks the column(s) {', '.join(missing)}; it does not look like a ChestX-ray14 "
            f"Data_Entry file (header: {', '.join(header[:9])}).",
            source,
        )
    return found


def _parse_row(fields: list[str], header: list[str], col: dict[str, int]) -> dict[str, Any]:
    values = [f.strip() for f in fields]
    while len(values) > len(header) and values[-1] == "":
        values.pop()
    if len(values) != len(header):
        raise ValueError(f"{len(values)} fields where the header has {len(header)}")
    image_id = values[col["image"]]
    if not image_id or "/" in image_id or "\\" in image_id or image_id in (".", ".."):
        raise ValueError(f"invalid Image Index {image_id!r}")
    patient = values[col["patient"]]
    if not patient:
        raise ValueError("empty Patient ID")
    findings = parse_finding_labels(values[col["labels"]])
    return {
        "image_id": image_id,
        "patient_id": str(int(patient)) if patient.isdigit() else patient,
        "study": _int_or_none(values, col.get("followup"), "Follow-up #"),
        "label": int(any(findings)),
        "findings": findings,
        "sex": parse_sex(values[col["sex"]]) if "sex" in col else None,
        "age": parse_age(values[col["age"]]) if "age" in col else None,
        "view": (values[col["view"]].upper() or None) if "view" in col else None,
    }


@functools.lru_cache(maxsize=4096)  # ~800 distinct label strings in 112k rows
def parse_finding_labels(text: str) -> tuple[int, ...]:
    """``"Effusion|Pleural_Thickening"`` -> 14 flags in FINDINGS order; "No Finding" -> all zeros."""
    names = [n.strip() for n in text.split("|") if n.strip()]
    if not names:
        raise ValueError("empty Finding Labels")
    if any(n.lower() == NO_FINDING.lower() for n in names):
        if len(names) > 1:
            raise ValueError(f"'No Finding' combined with findings in {text!r}")
        return (0,) * len(FINDINGS)
    flags = [0] * len(FINDINGS)
    for name in names:
        index = _FINDING_INDEX.get(re.sub(r"[ _]", "", name.lower()))
        if index is None:
            raise ValueError(f"unknown finding {name!r} (expected one of {', '.join(CSV_FINDING_NAMES)})")
        flags[index] = 1
    return tuple(flags)


def format_finding_labels(flags: Sequence[int]) -> str:
    """Inverse of :func:`parse_finding_labels`: the pipe-separated CSV spelling."""
    names = [CSV_FINDING_NAMES[i] for i, f in enumerate(flags) if f]
    return "|".join(names) if names else NO_FINDING


def _int_or_none(values: list[str], index: int | None, name: str) -> int | None:
    if index is None or not values[index]:
        return None
    try:
        return int(values[index])
    except ValueError:
        raise ValueError(f"{name} {values[index]!r} is not an integer") from None


def read_split_lists(root: Path) -> dict[str, str]:
    """image_id -> "train"/"test" from the official lists in ``root`` (empty when absent).

    An image on both lists is refused: the lists are the patient-wise split everything relies on.
    """
    split_of: dict[str, str] = {}
    for split, name in SPLIT_FILES.items():
        path = root / name
        if not path.is_file():
            continue
        for image_id in read_text(path).split():
            if split_of.get(image_id, split) != split:
                raise CsvFormatError(
                    f"{image_id} is on both {SPLIT_FILES['train']} and {SPLIT_FILES['test']}; "
                    "restore the official lists.",
                    str(path),
                )
            split_of[image_id] = split
    return split_of


def check_patient_splits(records: Iterable[ImageRecord]) -> None:
    """Refuse records where one patient has images in both the train and the test split."""
    sides: dict[str, set[str]] = {}
    for r in records:
        if r.split is not None and r.patient_id is not None:
            sides.setdefault(r.patient_id, set()).add(r.split)
    leaking = sorted(p for p, s in sides.items() if len(s) > 1)
    if leaking:
        raise CsvFormatError(
            f"{len(leaking)} patient(s) have images in both train and test (e.g. {', '.join(leaking[:5])}); "
            "the split lists must be patient-wise. Use the official lists or pass splits=False."
        )


def index_images(root: Path, sink: FailureSink) -> dict[str, Path]:
    """file name -> path for PNGs in ``images/``, ``images_###/images/``, ``images_###/`` or ``root``."""
    if not root.is_dir():
        raise ConfigError(f"Image folder {root} does not exist.")
    folders = [root, root / "images"]
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir() and re.fullmatch(r"images_\d+", entry.name):
            folders += [Path(entry.path), Path(entry.path) / "images"]
    found: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        folder = folder.resolve()  # once per folder, not per file: 112k resolve() calls add seconds
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if not entry.name.lower().endswith(IMAGE_SUFFIXES) or entry.is_dir():
                continue
            problem = _odd_entry(entry)
            if problem is not None:  # recorded, never opened: a FIFO would block, a bad name breaks Parquet
                name = display_name(entry.path)
                sink.report(ReadFailure(display_name(entry.name), name, *problem),
                            InputError(f"{name}: {problem[1]}.", name))  # fmt: skip
                continue
            if entry.name in found:
                sink.report(
                    ReadFailure(entry.name, entry.path, "duplicate", f"also at {found[entry.name]}"),
                    InputError(
                        f"{entry.name} exists twice: {found[entry.name]} and {entry.path}.", entry.path
                    ),
                )
                continue
            found[entry.name] = Path(entry.path)
    return found


def _odd_entry(entry: os.DirEntry) -> tuple[str, str] | None:
    """(stage, reason) for an entry that must not be read as an image, else None."""
    if not utf8_name(entry.name):
        return "file_name", "file name is not valid UTF-8; rename the file to index it"
    if not entry.is_file():
        return "special_file", "not a regular file (FIFO, socket, device or broken link): never opened"
    return None


def write_data_entry(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write a Data_Entry_2017_v2020.csv exactly as NIH lays it out (unquoted bracket headers).

    Each row: image_id, findings (14 flags), study, patient_id, age, sex, view, width, height, spacing.
    """
    lines = [DATA_ENTRY_HEADER]
    for r in rows:
        lines.append(
            f"{r['image_id']},{format_finding_labels(r['findings'])},{r['study']},{r['patient_id']},"
            f"{int(r['age'])},{r['sex']},{r['view']},{r['width']},{r['height']},"
            f"{r['spacing']:.3f},{r['spacing']:.3f}"
        )
    path.write_text("\n".join(lines) + "\n")


def write_split_lists(root: Path, split_of: dict[str, str]) -> None:
    """Write train_val_list.txt / test_list.txt (one image name per line, sorted) in ``root``."""
    for split, name in SPLIT_FILES.items():
        ids = sorted(i for i, s in split_of.items() if s == split)
        (root / name).write_text("".join(f"{i}\n" for i in ids))
