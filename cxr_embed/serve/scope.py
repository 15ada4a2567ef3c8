"""Uploaded bytes -> a model-ready image, or a reason to abstain; nothing identifying survives.

What is in scope is a single-frame chest radiograph. For DICOM that is decided from the header
(:func:`dicom_scope`): Modality CR, DX, RG or CX; Body Part Examined CHEST or absent; no burned-in
annotation (pixels that may carry a name); one frame. PNG/JPEG carry no such facts, so they are
taken as chest radiographs and only the store-distance check (see :mod:`cxr_embed.serve.engine`)
can reject them.

Privacy: of a DICOM header only the scope fields above are read, plus Patient ID, which becomes the
same salted pseudonym the index uses (so the query's own patient can be excluded from its
neighbours), and SOP Instance UID, which becomes an HMAC ``query_id`` a client may correlate. No
raw header value is returned, logged or kept; reasons quote only DICOM code strings (Modality) and
never the text of an exception raised while parsing the file, which could echo header bytes.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from typing import Any

from PIL import Image

from cxr_embed.imageio import to_model_mode
from cxr_embed.readers.dicom import DEFAULT_SALT, PIXEL_TAGS, SALT_ENV, dataset_to_image, pseudonym

CHEST_MODALITIES = ("CR", "DX", "RG", "CX")
DICOM_TYPES = ("application/dicom", "application/dicom+octet-stream")
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg")
_CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")


@dataclass(frozen=True)
class Abstention:
    """Why an input gets no decision: ``code`` is one of out-of-scope, undecodable, too-large, out-of-distribution."""

    code: str
    detail: str


@dataclass(frozen=True)
class DecodedUpload:
    """One uploaded file after decoding: an 8-bit L/RGB image or an abstention, and only pseudonyms."""

    kind: str  # "dicom" | "png" | "jpeg" | "unknown"
    size: int  # bytes received
    image: Image.Image | None
    abstention: Abstention | None = None
    patient: str | None = None  # store-compatible pseudonym of Patient ID
    query_id: str | None = None  # HMAC of SOP Instance UID


def id_key() -> bytes:
    """The pseudonymisation secret: the index's salt, so a patient hashes to the id it has in the store.

    Seam: the DICOM de-identification issue owns this salt; switch to its accessor at merge.
    """
    return os.environ.get(SALT_ENV, DEFAULT_SALT).encode()


def sniff_kind(data: bytes, content_type: str | None) -> str:
    """dicom / png / jpeg / unknown, from the magic bytes first and the declared type second."""
    if data[128:132] == b"DICM":
        return "dicom"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype in DICOM_TYPES:
        return "dicom"  # a Part-10 file without preamble, or a bare dataset
    return "unknown"


def decode_upload(data: bytes, content_type: str | None, *, max_pixels: int, key: bytes) -> DecodedUpload:
    """Decode one upload; every failure is an :class:`Abstention`, never an exception."""
    kind = sniff_kind(data, content_type)
    if kind == "dicom":
        return _decode_dicom(data, max_pixels, key)
    if kind == "unknown":
        return DecodedUpload(
            kind,
            len(data),
            None,
            Abstention("undecodable", "not a DICOM, PNG or JPEG file (checked the file's first bytes)."),
        )
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                return DecodedUpload(kind, len(data), None, _too_large(img.width * img.height, max_pixels))
            img.load()
            return DecodedUpload(kind, len(data), to_model_mode(img))
    except Exception as exc:  # noqa: BLE001 - decoder boundary: a bad upload is the upload's fault
        return DecodedUpload(
            kind,
            len(data),
            None,
            Abstention(
                "undecodable",
                f"cannot decode the {kind.upper()} image ({type(exc).__name__}); it is truncated or corrupt.",
            ),
        )


def _too_large(pixels: int, limit: int) -> Abstention:
    return Abstention("too-large", f"{pixels} pixels exceed this server's limit of {limit}.")


def dicom_scope(ds: Any) -> Abstention | None:
    """None when the dataset is a single-frame chest radiograph by the rules above, else why not."""
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality not in CHEST_MODALITIES:
        shown = (
            modality if _CODE_STRING.fullmatch(modality) else ("absent" if not modality else "unrecognised")
        )
        return Abstention(
            "out-of-scope",
            f"Modality {shown} is not a radiograph (expected one of {', '.join(CHEST_MODALITIES)}).",
        )
    body = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if body and body != "CHEST":
        return Abstention("out-of-scope", "Body Part Examined is not CHEST.")
    if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
        return Abstention(
            "out-of-scope", "the image has burned-in annotation (text that may identify the patient)."
        )
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        return Abstention(
            "out-of-scope", f"a multi-frame object ({frames} frames) is not a single radiograph."
        )
    return None


def _decode_dicom(data: bytes, max_pixels: int, key: bytes) -> DecodedUpload:
    """Seam: the DICOM issue's reader decodes pixels; here it is ``readers.dicom.dataset_to_image``."""
    import pydicom

    size = len(data)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt headers
        return DecodedUpload(
            "dicom",
            size,
            None,
            Abstention("undecodable", f"not a readable DICOM file ({type(exc).__name__})."),
        )
    return decode_dataset(ds, size, max_pixels=max_pixels, key=key)


def decode_dataset(ds: Any, size: int, *, max_pixels: int, key: bytes) -> DecodedUpload:
    """A parsed DICOM dataset (an upload, or a C-STORE) -> image or abstention, plus pseudonyms only."""
    try:  # pydicom parses lazily: a corrupt header fails here, not at dcmread
        patient = str(ds.get("PatientID", "") or "").strip()
        sop = str(ds.get("SOPInstanceUID", "") or "").strip()
        scope = dicom_scope(ds)
        has_pixels = any(tag in ds for tag in PIXEL_TAGS)
    except Exception as exc:  # noqa: BLE001 - decoder boundary
        return DecodedUpload(
            "dicom",
            size,
            None,
            Abstention("undecodable", f"not a readable DICOM file ({type(exc).__name__})."),
        )
    pseudo = pseudonym(patient, key) if patient else None
    query_id = pseudonym(sop, key) if sop else None

    def abstain(reason: Abstention) -> DecodedUpload:
        return DecodedUpload("dicom", size, None, reason, pseudo, query_id)

    if scope is not None:
        return abstain(scope)
    if not has_pixels:
        return abstain(Abstention("undecodable", "the DICOM object has no pixel data."))
    try:
        pixels = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)
    except (TypeError, ValueError):
        pixels = 0
    if pixels > max_pixels:
        return abstain(_too_large(pixels, max_pixels))
    try:
        image = dataset_to_image(ds)
    except Exception as exc:  # noqa: BLE001 - decoder boundary
        return abstain(
            Abstention("undecodable", f"cannot decode the DICOM pixel data ({type(exc).__name__}).")
        )
    return DecodedUpload("dicom", size, image, None, pseudo, query_id)
