"""Uploaded bytes -> a model-ready image, or a reason to abstain; nothing identifying survives.

What is in scope is a single-frame chest radiograph. For DICOM that is decided from the header by
the DICOM reader's own rule (:func:`cxr_embed.readers.dicom.out_of_scope` with its defaults:
Modality CR, DX, RG or CX; Body Part Examined CHEST or absent; no burned-in annotation; one
frame), so ``index`` and ``serve`` accept exactly the same objects. PNG/JPEG carry no such facts,
so they are taken as chest radiographs and only the store-distance check (see
:mod:`cxr_embed.serve.engine`) can reject them.

Privacy: the header is de-identified by :func:`cxr_embed.readers.dicom_headers.dataset_entry`
under the store's de-identification key (:func:`cxr_embed.readers.deid.load_key`), so Patient ID
becomes the pseudonym the store holds (the query's own patient can be excluded from its
neighbours) and SOP Instance UID the ``2.25.…`` image id the index would give it (``query_id``).
No raw header value is returned, logged or kept; reasons quote only DICOM code strings and never
the text of an exception raised while parsing the file, which could echo header bytes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from cxr_embed.errors import StoreIdentityError
from cxr_embed.imageio import dataset_to_image, to_model_mode
from cxr_embed.listing import IDENTITY_KEY
from cxr_embed.readers.deid import IdKey, load_key
from cxr_embed.readers.dicom import out_of_scope
from cxr_embed.readers.dicom_headers import dataset_entry

if TYPE_CHECKING:
    from cxr_embed.store import Store

DICOM_TYPES = ("application/dicom", "application/dicom+octet-stream")
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg")


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
    patient: str | None = None  # the store's pseudonym of Patient ID
    query_id: str | None = None  # the pseudonymous image id (2.25.…) of SOP Instance UID


def store_key(store: Store, key_file: str | Path | None = None) -> IdKey:
    """The de-identification key (``--key-file``, $CXR_EMBED_ID_SALT or the user's key file), refused
    when the store was indexed with another: an upload's patient would then never match the store's
    pseudonym, and "exclude the query's own patient" would silently exclude nobody."""
    key = load_key(key_file)
    recorded = (store.manifest.get("identity") or {}).get(IDENTITY_KEY)
    if recorded and recorded != key.fingerprint:
        raise StoreIdentityError.for_key(store.path, recorded, key.fingerprint)
    return key


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


def decode_upload(data: bytes, content_type: str | None, *, max_pixels: int, key: IdKey) -> DecodedUpload:
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


def _decode_dicom(data: bytes, max_pixels: int, key: IdKey) -> DecodedUpload:
    """Parse the whole upload (pixels included: it is decoded next) and hand it to :func:`decode_dataset`."""
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


def decode_dataset(ds: Any, size: int, *, max_pixels: int, key: IdKey) -> DecodedUpload:
    """A parsed DICOM dataset (an upload, or a C-STORE) -> image or abstention, plus pseudonyms only."""
    try:  # pydicom parses lazily: a corrupt header fails here, not at dcmread
        entry = dataset_entry(ds, key)
    except Exception as exc:  # noqa: BLE001 - decoder boundary
        return DecodedUpload(
            "dicom",
            size,
            None,
            Abstention("undecodable", f"not a readable DICOM file ({type(exc).__name__})."),
        )

    def abstain(reason: Abstention) -> DecodedUpload:
        return DecodedUpload("dicom", size, None, reason, entry.patient, entry.uid)

    if entry.kind != "image":  # no pixels, no SOP Instance UID: the reader's reasons, path-free
        return abstain(Abstention("undecodable", f"{entry.reason}."))
    why = out_of_scope(entry)
    if why is not None:
        return abstain(Abstention("out-of-scope", f"{why}."))
    pixels = (entry.rows or 0) * (entry.columns or 0)
    if pixels > max_pixels:
        return abstain(_too_large(pixels, max_pixels))
    try:
        image = dataset_to_image(ds)
    except Exception as exc:  # noqa: BLE001 - decoder boundary
        return abstain(
            Abstention("undecodable", f"cannot decode the DICOM pixel data ({type(exc).__name__}).")
        )
    return DecodedUpload("dicom", size, image, None, entry.patient, entry.uid)
