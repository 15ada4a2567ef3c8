"""Any folder of chest X-ray images (PNG, JPEG, TIFF, BMP, DICOM …), labelled by a CSV or by sub-folders.

With a label CSV (``labels=...``, or ``labels.csv`` in the folder) the columns are chosen by options,
so a hospital export's own spreadsheet works as it is. Without one, the first sub-folder names the
label: ``normal/``, ``negative/``, ``no_finding/``, ``0/`` -> 0 and ``abnormal/``, ``positive/``,
``1/`` -> 1 (anything else: unknown). The image id is the path relative to the folder, which is
unique and stable across machines.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cxr_embed.errors import ConfigError, CsvFormatError, InputError
from cxr_embed.readers.chestxray14 import parse_finding_labels, read_text
from cxr_embed.readers.walk import display_name, utf8_name, walk
from cxr_embed.records import FailureSink, ImageRecord, ReadFailure, parse_age, parse_label, parse_sex

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".dcm", ".dicom")
LABEL_CSV = "labels.csv"
PATH_COLUMNS = ("path", "file", "filename", "file_name", "image", "Image Index", "image_id")


@dataclass(frozen=True)
class LabelColumns:
    """Which CSV columns hold what; None = not in this CSV. ``path`` is required."""

    path: str
    image_id: str | None = None
    label: str | None = None
    findings: str | None = None
    patient: str | None = None
    study: str | None = None
    split: str | None = None
    sex: str | None = None
    age: str | None = None
    view: str | None = None


def read(
    root: Path,
    *,
    errors: list | None = None,
    labels: str | Path | None = None,
    path_column: str | None = None,
    id_column: str | None = None,
    label_column: str | None = None,
    findings_column: str | None = None,
    patient_column: str | None = None,
    study_column: str | None = None,
    split_column: str | None = None,
    follow_symlinks: bool = False,
) -> list[ImageRecord]:
    """Records for the images under ``root`` (sorted by path), labelled from a CSV or sub-folders.

    ``labels``: CSV path (default ``root/labels.csv`` when present). Column options default to the
    usual names when the CSV has them: path/file/filename/image/Image Index, image_id, label,
    finding_labels (ChestX-ray14 style, gives findings and the label), patient_id, study, split,
    sex, age, view. Listed-but-missing and present-but-unlisted images are reported, so are repeated
    CSV rows (stage "duplicate"), entries the walk does not read (symlinks out of the folder unless
    ``follow_symlinks``, FIFOs, devices: see :mod:`cxr_embed.readers.walk`) and file names that are
    not valid UTF-8 (stage "file_name": the store's text columns cannot hold them).
    """
    sink = FailureSink(errors)
    if root.is_file():
        raise ConfigError(f"{root} is a file; the folder reader takes a folder of images.")
    found = walk(root, follow_symlinks=follow_symlinks)
    for skipped in found.skipped:
        name = display_name(skipped.path.relative_to(root))
        sink.report(ReadFailure(name, display_name(skipped.path), skipped.stage, skipped.reason),
                    InputError(f"{display_name(skipped.path)}: {skipped.reason}.", display_name(skipped.path)))  # fmt: skip
    images = {}
    for p in found.files:
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if not utf8_name(p):
            name = display_name(p)
            reason = "file name is not valid UTF-8; rename the file (e.g. with convmv) to index it"
            sink.report(ReadFailure(display_name(p.relative_to(root)), name, "file_name", reason),
                        InputError(f"{name}: {reason}.", name))  # fmt: skip
            continue
        images[p.relative_to(root).as_posix()] = p
    csv_path = (
        Path(labels) if labels is not None else (root / LABEL_CSV if (root / LABEL_CSV).is_file() else None)
    )
    if csv_path is None:
        return [_from_subfolder(rel, path) for rel, path in sorted(images.items())]
    table, header = read_label_csv(csv_path)
    columns = choose_columns(
        header, str(csv_path), path=path_column, image_id=id_column, label=label_column,
        findings=findings_column, patient=patient_column, study=study_column, split=split_column,
    )  # fmt: skip
    records = []
    listed: dict[str, int] = {}  # relative path -> first CSV line listing it
    for line_no, row in table:
        rel = Path(row[columns.path].strip()).as_posix()
        image_id = row[columns.image_id].strip() if columns.image_id else rel
        if rel in listed:
            sink.report(
                ReadFailure(image_id, str(root / rel), "duplicate",
                            f"{csv_path.name} line {line_no} lists the same image as line {listed[rel]}, which is used"),
                CsvFormatError(f"{csv_path} line {line_no} repeats {rel} (first on line {listed[rel]}). Remove one.",
                               str(csv_path)),
            )  # fmt: skip
            continue
        listed[rel] = line_no
        path = images.get(rel)
        if path is None:
            sink.report(
                ReadFailure(image_id, str(root / rel), "missing", f"listed in {csv_path.name} but not found"),
                InputError(
                    f"{rel} is listed in {csv_path} (line {line_no}) but not found under {root}.", rel
                ),
            )
            continue
        try:
            records.append(record_from_row(row, columns, image_id, str(path), "folder"))
        except ValueError as exc:
            sink.report(
                ReadFailure(image_id, str(path), "csv", f"line {line_no}: {exc}"),
                CsvFormatError(
                    f"{csv_path} line {line_no} ({rel}): {exc}. Fix or remove that row.", str(csv_path)
                ),
            )
    for rel in sorted(set(images) - set(listed)):
        sink.report(
            ReadFailure(
                rel, str(images[rel]), "unlisted", f"image on disk but not listed in {csv_path.name}"
            ),
            InputError(f"{images[rel]} is not listed in {csv_path}; it has no labels.", str(images[rel])),
        )
    return records


def _from_subfolder(rel: str, path: Path) -> ImageRecord:
    parts = rel.split("/")
    try:
        label = parse_label(parts[0]) if len(parts) > 1 else None
    except ValueError:  # a sub-folder that names no label (e.g. a hospital site): unknown
        label = None
    return ImageRecord(rel, str(path.resolve()), None, None, None, label, None, None, None, None, "folder")


def read_label_csv(path: Path) -> tuple[list[tuple[int, dict[str, str]]], list[str]]:
    """(line number, row dict) pairs and the header of a label CSV; malformed files raise CsvFormatError."""
    text = read_text(path)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        rows = [
            (reader.line_num, row)
            for row in reader
            if any((v or "").strip() for v in row.values() if isinstance(v, str))
        ]
    except csv.Error as exc:
        raise CsvFormatError(f"{path} is not a readable CSV: {exc}.", str(path)) from None
    if not header:
        raise CsvFormatError(f"{path} is empty; expected a header row with a path column.", str(path))
    for line_no, row in rows:
        if None in row or any(v is None for v in row.values()):
            raise CsvFormatError(
                f"{path} line {line_no} has a different number of fields than the header.", str(path)
            )
    return rows, header


def choose_columns(header: Sequence[str], source: str, **chosen: str | None) -> LabelColumns:
    """Resolve column options against ``header``: an explicit choice must exist, defaults are optional."""
    defaults = {
        "path": PATH_COLUMNS, "image_id": (), "label": ("label",), "findings": ("finding_labels", "Finding Labels"),
        "patient": ("patient_id", "Patient ID"), "study": ("study", "Follow-up #"), "split": ("split",),
        "sex": ("sex", "Patient Sex", "Patient Gender"), "age": ("age", "Patient Age"),
        "view": ("view", "View Position"),
    }  # fmt: skip
    resolved: dict[str, str | None] = {}
    for key, names in defaults.items():
        explicit = chosen.get(key)
        if explicit is not None:
            if explicit not in header:
                raise ConfigError(f"{source} has no column {explicit!r} (columns: {', '.join(header)}).")
            resolved[key] = explicit
        else:
            resolved[key] = next((n for n in names if n in header), None)
    if resolved["path"] is None:
        raise CsvFormatError(
            f"{source} has no image path column (looked for {', '.join(PATH_COLUMNS)}); choose one with the "
            "path column option.",
            source,
        )
    return LabelColumns(**resolved)  # type: ignore[arg-type]


def record_from_row(
    row: dict[str, str], c: LabelColumns, image_id: str, path: str, source: str
) -> ImageRecord:
    """One record from a label-CSV row; a malformed value raises ValueError (reported by the caller)."""

    def get(column: str | None) -> str:
        return (row.get(column) or "").strip() if column else ""

    findings = parse_finding_labels(get(c.findings)) if get(c.findings) else None
    label = parse_label(get(c.label)) if get(c.label) else None
    if label is None and findings is not None:
        label = int(any(findings))
    if label is not None and findings is not None and label != int(any(findings)):
        raise ValueError(f"label {label} contradicts the findings {get(c.findings)!r}")
    split = get(c.split).lower() or None
    if split is not None:
        split = {"train_val": "train", "trainval": "train", "val": "train"}.get(split, split)
        if split not in ("train", "test"):
            raise ValueError(f"split {get(c.split)!r} is not train or test")
    study = get(c.study)
    return ImageRecord(
        image_id=image_id,
        path=path,
        patient_id=get(c.patient) or None,
        study=int(study) if study else None,
        split=split,
        label=label,
        findings=findings,
        sex=parse_sex(get(c.sex)),
        age=parse_age(get(c.age)),
        view=get(c.view).upper() or None,
        source=source,
    )
