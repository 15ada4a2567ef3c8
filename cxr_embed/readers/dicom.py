"""Hospital DICOM exports: de-identified, chest-radiograph-only records (pixels: :mod:`cxr_embed.imageio`).

Privacy (DICOM PS3.15 Basic Profile as the reference): a record carries only keyed pseudonyms —
SOP Instance UID -> ``2.25.<integer>`` (the image id), Patient ID -> 16 hex digits, the file's path
-> ``ref-…`` (``stored_path``, what the store's ``path`` column holds) — plus a study number ranked
per patient, Patient Sex, Patient Age (capped at 90), and the non-identifying acquisition
attributes users filter by (modality, body part, view, photometric, bits, size, pixel spacing,
manufacturer and model, frames). Names, dates, accession numbers, institutions, physicians,
operators, stations, serial numbers, study ids and free text are never read into a record. The
key is :func:`cxr_embed.readers.deid.load_key`'s; failures name files by reference only.

Scope: Modality CR/DX (and "RG"/"CX") with BodyPartExamined CHEST or absent, by default; anything
else, burned-in annotations and multi-frame objects are failures with stage ``out_of_scope`` and a
reason saying which option accepts them. Among files sharing a SOP Instance UID the one that
decodes is kept (then the first by path); the others are ``duplicate`` failures naming the kept
file's pseudonymous id.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from cxr_embed.errors import ConfigError, DicomError, InputError
from cxr_embed.imageio import read_dicom_image
from cxr_embed.readers import PLAIN_IMAGE_SUFFIXES
from cxr_embed.readers.deid import IdKey, load_key
from cxr_embed.readers.dicom_headers import HeaderEntry, HeaderStats, list_headers
from cxr_embed.readers.folder import LABEL_CSV, choose_columns, read_label_csv, record_from_row
from cxr_embed.readers.walk import walk
from cxr_embed.records import FailureSink, ImageRecord, ReadFailure

DEFAULT_MODALITIES = ("CR", "DX", "RG", "CX")
DEFAULT_BODY_PARTS = ("CHEST",)
FRAME_MODES = ("first", "all")
NOT_LISTED = ("DICOMDIR", LABEL_CSV)
_CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")  # DICOM CS: what a real Modality looks like


@dataclass
class DicomListing:
    """Records and failures of one listing, the key used, and reference -> file for every file seen."""

    records: list[ImageRecord]
    failures: list[ReadFailure]
    key: IdKey
    links: dict[str, Path] = field(default_factory=dict)
    stats: HeaderStats = field(default_factory=HeaderStats)


def read(
    root: Path,
    *,
    errors: list | None = None,
    labels: str | Path | None = None,
    path_column: str | None = None,
    id_column: str | None = None,
    label_column: str | None = None,
    findings_column: str | None = None,
    split_column: str | None = None,
    key_file: str | Path | None = None,
    modality: str | Iterable[str] | None = None,
    body_part: str | Iterable[str] | None = None,
    allow_burned_in: bool = False,
    frames: str | None = None,
    follow_symlinks: bool = False,
    workers: int | None = None,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> list[ImageRecord]:
    """De-identified records for every in-scope DICOM image under ``root`` (a folder or one file).

    ``labels``: label CSV (default ``root/labels.csv`` when present) whose path column holds paths
    relative to ``root`` and whose id column (``image_id`` by default), if any, holds the original
    SOP Instance UIDs; label, findings and split are taken from it. ``key_file``: the
    de-identification key (see :func:`~cxr_embed.readers.deid.load_key`). ``modality`` /
    ``body_part``: accepted values (comma-separated or a list; ``"any"`` accepts all).
    ``allow_burned_in``: accept BurnedInAnnotation YES. ``frames``: ``"first"`` or ``"all"`` to
    accept multi-frame files (one record, or one per frame). ``workers``: header-reading processes.
    ``cache_dir``: where the header cache lives (the store's ``cache/``).
    """
    listing = list_dicom(
        root, labels=labels, path_column=path_column, id_column=id_column, label_column=label_column,
        findings_column=findings_column, split_column=split_column, key=load_key(key_file), modality=modality,
        body_part=body_part, allow_burned_in=allow_burned_in, frames=frames, follow_symlinks=follow_symlinks,
        workers=workers, cache_dir=cache_dir, progress=progress,
    )  # fmt: skip
    sink = FailureSink(errors)
    for f in listing.failures:
        where = listing.links.get(f.path, f.path)
        error = DicomError if f.stage == "dicom" else InputError
        sink.report(f, error(f"{where}: {f.reason}.", str(where)))
    return listing.records


def list_dicom(
    root: Path,
    *,
    labels: str | Path | None = None,
    path_column: str | None = None,
    id_column: str | None = None,
    label_column: str | None = None,
    findings_column: str | None = None,
    split_column: str | None = None,
    key: IdKey,
    modality: str | Iterable[str] | None = None,
    body_part: str | Iterable[str] | None = None,
    allow_burned_in: bool = False,
    frames: str | None = None,
    follow_symlinks: bool = False,
    workers: int | None = None,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> DicomListing:
    """:func:`read` with a loaded ``key``, returning a :class:`DicomListing` (:func:`cxr_embed.listing.list_source`)."""
    if frames is not None and frames not in FRAME_MODES:
        raise ConfigError(f"--frames must be one of {', '.join(FRAME_MODES)}, got {frames!r}.")
    modalities = _accepted(modality, DEFAULT_MODALITIES)
    body_parts = _accepted(body_part, DEFAULT_BODY_PARTS)
    base = root.parent if root.is_file() else root
    found = walk(root, follow_symlinks=follow_symlinks) if root.is_dir() else None
    files = [root] if found is None else [p for p in found.files if p.name not in NOT_LISTED]
    label_csv = Path(labels) if labels is not None else None
    if label_csv is None and found is not None and (root / LABEL_CSV).is_file():
        label_csv = root / LABEL_CSV
    files = [p for p in files if label_csv is None or p != label_csv]
    out = DicomListing([], [], key)
    rels = [os.fsencode(_relative(p, base)) for p in files]
    refs = [key.reference(rel) for rel in rels]
    out.links.update(zip(refs, files, strict=True))
    for skipped in found.skipped if found is not None else []:
        ref = key.reference(os.fsencode(_relative(skipped.path, base)))
        out.links[ref] = skipped.path
        out.failures.append(ReadFailure(ref, ref, skipped.stage, skipped.reason))
    workers = workers if workers is not None else max(1, min(8, (os.cpu_count() or 2) // 2))
    entries = list_headers(files, rels, key, workers=workers, cache_dir=cache_dir, progress=progress,
                           stats=out.stats)  # fmt: skip
    kept: list[tuple[Path, str, HeaderEntry]] = []
    for path, ref, entry in zip(files, refs, entries, strict=True):
        if entry.kind == "not_dicom" and path.suffix.lower() not in PLAIN_IMAGE_SUFFIXES:
            del out.links[ref]  # not an image at all (a README, an XML manifest): not an input, as in folders
            continue
        if entry.kind != "image":
            stage = "not_dicom" if entry.kind == "not_dicom" else "dicom"
            out.failures.append(ReadFailure(entry.uid or ref, ref, stage, entry.reason or entry.kind))
            continue
        why = out_of_scope(entry, modalities, body_parts, allow_burned_in, frames)
        if why is not None:
            out.failures.append(ReadFailure(entry.uid or ref, ref, "out_of_scope", why))
            continue
        kept.append((path, ref, entry))
    kept = _drop_duplicates(kept, out.failures)
    studies = _study_numbers([e for _, _, e in kept])
    label_rows = _label_rows(label_csv, base, key, out.failures, path=path_column, image_id=id_column,
                             label=label_column, findings=findings_column, split=split_column)  # fmt: skip
    for path, ref, e in kept:
        record = _record(path, ref, e, studies.get(e.uid))
        labelled = label_rows.get(e.uid or "") or label_rows.get(ref)
        if labelled is not None:
            record = replace(record, label=labelled.label, findings=labelled.findings, split=labelled.split)
        if frames == "all" and (e.frames or 1) > 1:
            out.records += [replace(record, image_id=f"{record.image_id}.{k + 1}", stored_path=f"{ref}#{k + 1}",
                                    frame=k) for k in range(e.frames or 1)]  # fmt: skip
        else:
            out.records.append(record)
    return out


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


def _accepted(value: str | Iterable[str] | None, default: tuple[str, ...]) -> frozenset[str] | None:
    """Upper-cased accepted values; None means "any"."""
    if value is None:
        return frozenset(default)
    items = [v for part in ([value] if isinstance(value, str) else value) for v in str(part).split(",")]
    names = {v.strip().upper() for v in items if v.strip()}
    return None if "ANY" in names or "*" in names else frozenset(names)


def out_of_scope(
    e: HeaderEntry,
    modalities: frozenset[str] | None = frozenset(DEFAULT_MODALITIES),
    body_parts: frozenset[str] | None = frozenset(DEFAULT_BODY_PARTS),
    allow_burned_in: bool = False,
    frames: str | None = None,
) -> str | None:
    """Why ``e`` is not a chest radiograph this run accepts (None: it is); also ``serve``'s rule.

    The reason quotes Modality / BodyPartExamined only when they are DICOM code strings: a free-text value could
    be a name, and reasons are stored (errors table) and returned (serve).
    """
    if modalities is not None and (e.modality or "") not in modalities:
        return (f"Modality {_shown(e.modality)} is not accepted (accepted: {', '.join(sorted(modalities))}; "
                "change with --modality)")  # fmt: skip
    if body_parts is not None and e.body_part is not None and e.body_part not in body_parts:
        return (f"BodyPartExamined {_shown(e.body_part)} is not accepted (accepted: {', '.join(sorted(body_parts))} or "
                "absent; change with --body-part)")  # fmt: skip
    if e.burned_in == "YES" and not allow_burned_in:
        return ("BurnedInAnnotation is YES: text in the pixels may identify the patient (accept with "
                "--allow-burned-in after checking)")  # fmt: skip
    if (e.frames or 1) > 1 and frames is None:
        return f"multi-frame object ({e.frames} frames): pass --frames first or --frames all to index it"
    return None


def _shown(value: str | None) -> str:
    """A header code string as a reason may quote it; anything else is not repeated."""
    if not value:
        return "(absent)"
    return value if _CODE_STRING.fullmatch(value) else "(not a code string)"


def _drop_duplicates(
    kept: list[tuple[Path, str, HeaderEntry]], failures: list[ReadFailure]
) -> list[tuple[Path, str, HeaderEntry]]:
    """One file per SOP Instance UID: the first (by path) that decodes, else the first by path."""
    groups: dict[str, list[tuple[Path, str, HeaderEntry]]] = {}
    for item in kept:
        groups.setdefault(item[2].uid or item[1], []).append(item)
    winners = {}
    for uid, group in groups.items():
        winner = group[0]
        if len(group) > 1:
            winner = next((item for item in group if _decodes(item[0])), group[0])
            for path, ref, _ in group:
                if path != winner[0]:
                    failures.append(ReadFailure(uid, ref, "duplicate", f"same SOP Instance UID as {winner[1]}, "
                                                "which is kept (the first copy that decodes)"))  # fmt: skip
        winners[uid] = winner[0]
    return [item for item in kept if winners[item[2].uid or item[1]] == item[0]]


def _decodes(path: Path) -> bool:
    try:
        read_dicom_image(path)
    except Exception:  # noqa: BLE001 - any failure means "this copy does not decode"
        return False
    return True


def _study_numbers(entries: list[HeaderEntry]) -> dict[str | None, int | None]:
    """Per patient, studies ranked by (shifted time, pseudonymous Study UID) from 0, like follow-up numbers."""
    by_patient: dict[str, set[tuple[bool, int, str]]] = {}
    key_of = {}
    for e in entries:
        if e.patient is None:
            continue
        key_of[e.uid] = (e.study_time is None, e.study_time or 0, e.study_uid or "")
        by_patient.setdefault(e.patient, set()).add(key_of[e.uid])
    rank = {p: {k: i for i, k in enumerate(sorted(keys))} for p, keys in by_patient.items()}
    return {e.uid: (rank[e.patient][key_of[e.uid]] if e.patient is not None else None) for e in entries}


def _record(path: Path, ref: str, e: HeaderEntry, study: int | None) -> ImageRecord:
    return ImageRecord(
        image_id=e.uid or ref, path=str(path), patient_id=e.patient, study=study, split=None, label=None,
        findings=None, sex=e.sex, age=e.age, view=e.view, source="dicom", stored_path=ref, modality=e.modality,
        body_part=e.body_part, photometric=e.photometric, bits_stored=e.bits_stored, rows=e.rows,
        columns=e.columns, pixel_spacing_row=e.spacing_row, pixel_spacing_col=e.spacing_col,
        manufacturer=e.manufacturer, model_name=e.model_name, frames=e.frames,
    )  # fmt: skip


def _label_rows(
    csv_path: Path | None, base: Path, key: IdKey, failures: list[ReadFailure], **columns: str | None
) -> dict[str, ImageRecord]:
    """Label CSV rows as partial records keyed by pseudonymous SOP UID (id column) and by file reference."""
    if csv_path is None:
        return {}
    table, header = read_label_csv(csv_path)
    if columns.get("image_id") is None and "image_id" in header:
        columns["image_id"] = "image_id"
    chosen = choose_columns(header, str(csv_path), **columns)
    keyed: dict[str, ImageRecord] = {}
    for line_no, row in table:
        rel = Path(row[chosen.path].strip()).as_posix()
        ref = key.reference(os.fsencode(rel))
        uid = (
            key.uid(row[chosen.image_id].strip())
            if chosen.image_id and row[chosen.image_id].strip()
            else None
        )
        try:
            partial = record_from_row(row, chosen, uid or ref, str(base / rel), "dicom")
        except ValueError as exc:
            failures.append(ReadFailure(uid or ref, ref, "csv", f"label CSV line {line_no}: {exc}"))
            continue
        keyed[ref] = partial
        if uid is not None:
            keyed[uid] = partial
    return keyed
