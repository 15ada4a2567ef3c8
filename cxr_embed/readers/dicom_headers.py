"""DICOM header listing: parallel, header-only, de-identified at the source, cached per store.

Why here and not in the reader: listing is the slow part of a hospital folder (pydicom parses
~8 ms per header), so it runs in worker processes with a progress bar, reads only up to the pixel
data, and is cached in ``<store>/cache`` so a resume re-reads only new or changed files. Each
worker turns raw header values into derived, non-identifying ones (:class:`HeaderEntry`) before
they leave it: the cache, the parent process and every later stage only ever see pseudonyms,
shifted study times and acquisition attributes. Cache rows are keyed by a keyed digest of
(relative path, size, mtime), so the cache holds neither paths nor time stamps, and its file name
carries the key fingerprint (another key never reads it).
"""

from __future__ import annotations

import calendar
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cxr_embed.atomicio import write_parquet_atomic
from cxr_embed.imageio import PIXEL_TAGS, is_dicom_file
from cxr_embed.progress import progress_bar
from cxr_embed.readers.deid import IdKey
from cxr_embed.records import parse_age, parse_sex

CACHE_VERSION = "1"
MIN_FILES_PER_WORKER = 64  # below this, starting processes costs more than it saves
MAX_AGE = 90.0  # HIPAA Safe Harbor: ages over 89 are aggregated into one "90 or older" category
_PIXEL_TAG_NUMBERS = {0x7FE00010, 0x7FE00008, 0x7FE00009}


@dataclass(frozen=True)
class HeaderEntry:
    """What one file's header contributes, already de-identified (``kind`` != "image": see ``reason``)."""

    kind: str  # "image" | "not_dicom" | "no_pixels" | "unreadable" | "no_uid"
    reason: str | None = None  # path-free
    uid: str | None = None  # keyed pseudonym of SOP Instance UID
    patient: str | None = None  # keyed pseudonym of Patient ID
    study_time: int | None = None  # study date+time in seconds, shifted per patient by a keyed offset
    study_uid: str | None = None  # keyed pseudonym of Study Instance UID
    sex: str | None = None
    age: float | None = None  # capped at MAX_AGE
    view: str | None = None
    modality: str | None = None
    body_part: str | None = None
    photometric: str | None = None
    bits_stored: int | None = None
    rows: int | None = None
    columns: int | None = None
    spacing_row: float | None = None
    spacing_col: float | None = None
    manufacturer: str | None = None
    model_name: str | None = None
    frames: int | None = None
    burned_in: str | None = None  # BurnedInAnnotation: "YES" | "NO" | None


_INT_FIELDS = {"study_time", "bits_stored", "rows", "columns", "frames"}
_FLOAT_FIELDS = {"age", "spacing_row", "spacing_col"}
CACHE_SCHEMA = pa.schema(
    [pa.field("digest", pa.string())]
    + [
        pa.field(
            f.name,
            pa.int64() if f.name in _INT_FIELDS else pa.float64() if f.name in _FLOAT_FIELDS else pa.string(),
        )
        for f in fields(HeaderEntry)
    ]
)


def read_header(path: str, key: IdKey) -> HeaderEntry:
    """De-identified header of one file; never raises (a bad file is an entry with a reason)."""
    p = Path(path)
    if not is_dicom_file(p):
        return HeaderEntry("not_dicom", "not a DICOM file (no DICM marker, no .dcm suffix)")
    from pydicom.filereader import read_partial

    saw_pixels: list[bool] = []

    def at_pixels(tag: Any, _vr: Any, _length: int) -> bool:
        if int(tag) in _PIXEL_TAG_NUMBERS:
            saw_pixels.append(True)
            return True
        return False

    try:
        with open(p, "rb") as fh:
            ds = read_partial(fh, stop_when=at_pixels, defer_size="64 KB", force=True)
            return dataset_entry(ds, key, bool(saw_pixels))
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt headers
        return HeaderEntry("unreadable", f"not a readable DICOM file ({type(exc).__name__})")


def dataset_entry(ds: Any, key: IdKey, saw_pixels: bool = False) -> HeaderEntry:
    """De-identified header of a parsed dataset (a file here, an upload or C-STORE in ``serve``).

    pydicom parses lazily, so a corrupt header can raise here: callers catch it (see :func:`read_header`).
    """
    text = {name: _text(ds, name) for name in _TEXT_FIELDS}
    numbers = _numbers(ds)
    if not saw_pixels and not any(tag in ds for tag in PIXEL_TAGS):
        return HeaderEntry("no_pixels", "DICOM file has no pixel data (a report, presentation state, …)")
    if not text["SOPInstanceUID"]:
        return HeaderEntry("no_uid", "DICOM file has no SOP Instance UID, so it cannot be identified")
    patient = text["PatientID"] or None
    return HeaderEntry(
        kind="image",
        uid=key.uid(text["SOPInstanceUID"]),
        patient=key.patient(patient) if patient else None,
        study_time=_shifted_time(text["StudyDate"], text["StudyTime"], patient, key),
        study_uid=key.uid(text["StudyInstanceUID"]) if text["StudyInstanceUID"] else None,
        sex=parse_sex(text["PatientSex"]),
        age=_age(text["PatientAge"]),
        view=text["ViewPosition"].upper() or None,
        modality=text["Modality"].upper() or None,
        body_part=text["BodyPartExamined"].upper() or None,
        photometric=text["PhotometricInterpretation"].upper() or None,
        manufacturer=text["Manufacturer"] or None,
        model_name=text["ManufacturerModelName"] or None,
        burned_in=text["BurnedInAnnotation"].upper() or None,
        **numbers,
    )


_TEXT_FIELDS = ("SOPInstanceUID", "PatientID", "StudyInstanceUID", "StudyDate", "StudyTime", "PatientSex",
                "PatientAge", "ViewPosition", "Modality", "BodyPartExamined", "PhotometricInterpretation",
                "Manufacturer", "ManufacturerModelName", "BurnedInAnnotation")  # fmt: skip


def _text(ds: Any, name: str) -> str:
    try:
        return str(ds.get(name, "") or "").strip()
    except Exception:  # noqa: BLE001 - a malformed value counts as absent
        return ""


def _numbers(ds: Any) -> dict[str, Any]:
    def num(name: str, cast: type, index: int | None = None) -> Any:
        try:
            value = ds.get(name)
            if value is None or value == "":
                return None
            return cast(value[index] if index is not None else value)
        except Exception:  # noqa: BLE001 - a malformed value counts as absent
            return None

    spacing = "PixelSpacing" if "PixelSpacing" in ds else "ImagerPixelSpacing"
    return {
        "bits_stored": num("BitsStored", int),
        "rows": num("Rows", int),
        "columns": num("Columns", int),
        "spacing_row": num(spacing, float, 0),
        "spacing_col": num(spacing, float, 1),
        "frames": num("NumberOfFrames", int) or 1,
    }


def _age(text: str) -> float | None:
    try:
        age = parse_age(text)
    except ValueError:
        return None
    return None if age is None else min(age, MAX_AGE)


def _shifted_time(date: str, time: str, patient: str | None, key: IdKey) -> int | None:
    """Seconds of StudyDate+StudyTime minus a keyed per-patient shift; None when there is no valid date."""
    if len(date) != 8 or not date.isdigit():
        return None
    digits = (time.split(".")[0] + "000000")[:6]
    try:
        hh, mm, ss = int(digits[:2]), int(digits[2:4]), int(digits[4:6])
        seconds = calendar.timegm((int(date[:4]), int(date[4:6]), int(date[6:]), hh, mm, ss, 0, 0, 0))
    except ValueError:
        return None
    return seconds - (key.date_shift_seconds(patient) if patient else 0)


# --------------------------------------------------------------------------- parallel + cached listing


@dataclass
class HeaderStats:
    """How a listing went: files whose header was read now vs taken from the cache."""

    read: int = 0
    cached: int = 0


def list_headers(
    paths: Sequence[Path],
    relatives: Sequence[bytes],
    key: IdKey,
    *,
    workers: int = 1,
    cache_dir: Path | None = None,
    progress: bool = False,
    stats: HeaderStats | None = None,
) -> list[HeaderEntry]:
    """Entries for ``paths`` (same order), reading only files that are new or changed since the cache."""
    digests = [_cache_digest(p, rel, key) for p, rel in zip(paths, relatives, strict=True)]
    cache_file = (
        cache_dir / f"dicom-headers-v{CACHE_VERSION}-{key.fingerprint}.parquet" if cache_dir else None
    )
    cached = _load_cache(cache_file)
    todo = [i for i, d in enumerate(digests) if d is None or d not in cached]
    entries: list[HeaderEntry | None] = [cached.get(d) if d else None for d in digests]
    with progress_bar(len(todo), "Reading DICOM headers", progress and bool(todo)) as bar:
        for i, entry in zip(todo, _read_many([str(paths[i]) for i in todo], key, workers), strict=True):
            entries[i] = entry
            bar.advance()
    if stats is not None:
        stats.read += len(todo)
        stats.cached += len(paths) - len(todo)
    if cache_file is not None and todo:
        _save_cache(cache_file, {d: e for d, e in zip(digests, entries, strict=True) if d and e})
    return entries  # type: ignore[return-value]


def _read_many(paths: list[str], key: IdKey, workers: int):
    """Headers in order; worker processes only when there are enough files to pay for starting them."""
    if workers <= 1 or len(paths) < MIN_FILES_PER_WORKER * workers:
        yield from (read_header(p, key) for p in paths)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:  # default start method, like DataLoader workers
        yield from pool.map(
            read_header, paths, [key] * len(paths), chunksize=max(1, min(256, len(paths) // (8 * workers)))
        )


def _cache_digest(path: Path, rel: bytes, key: IdKey) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return key.digest(rel + b"\0" + str(st.st_size).encode() + b"\0" + str(st.st_mtime_ns).encode())


def _load_cache(path: Path | None) -> dict[str, HeaderEntry]:
    if path is None or not path.is_file():
        return {}
    try:
        rows = pq.read_table(path).to_pylist()
        return {r.pop("digest"): HeaderEntry(**r) for r in rows}
    except Exception:  # noqa: BLE001 - a damaged cache only costs a re-read; never fail a listing over it
        return {}


def _save_cache(path: Path, entries: dict[str, HeaderEntry]) -> None:
    rows = [{"digest": d, **asdict(e)} for d, e in entries.items()]
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=CACHE_SCHEMA), path)
