"""Decode any supported image file to what the model's preprocessing takes: 8-bit "L" or "RGB".

Parity first: an 8-bit grayscale or RGB image passes through *untouched* (same pixels, same mode),
so that :class:`cxr_embed.preprocessing.Preprocessor` reproduces the official MedImageInsight eval
path exactly. The official code crashes on everything else; cxr-embed's policy instead
(``POLICY_VERSION`` is part of the preprocessing fingerprint, so a change re-indexes):

========================  =================================================================
input                     what the model sees
========================  =================================================================
L, RGB (8-bit)            unchanged (reference parity)
LA                        gray channel, alpha dropped without compositing: exactly what the
                          reference does (its ``convert('RGB')`` drops alpha)
RGBA, RGBa, RGBX          RGB, alpha dropped the same way (consistent with LA; compositing
                          onto black or white would invent pixel values)
P, PA (palette)           palette applied, transparency dropped -> RGB
1 (bilevel)               L with 0/255
CMYK, YCbCr, LAB, HSV     Pillow's conversion to RGB
I;16*, I (16/32-bit int)  **min-max window over the image's own value range** -> L 0..255.
F (float)                 Pillow's ``convert('L')`` would clip at 255 (a 16-bit radiograph
                          turns white); min-max keeps all the contrast, and a raw detector
                          image has no other trustworthy window. Non-finite values -> 0; a
                          constant image -> 0.
EXIF orientation 2-8      applied first (``ImageOps.exif_transpose``): the model sees the
                          image upright, as a viewer shows it. The reference ignores EXIF;
                          files without an orientation tag (or tag 1) are untouched.
DICOM                     :func:`dataset_to_image`: modality LUT, VOI LUT/window (else
                          min-max), MONOCHROME1 inverted, -> L (or RGB for colour DICOM)
multi-frame files         the first frame, or the ``frame`` asked for (DICOM)
========================  =================================================================

All pixel decoding lives here, DICOM included; readers import this module, never the reverse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from cxr_embed.errors import DependencyError, DicomError, ImageReadError

POLICY_VERSION = "1"
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
TO_RGB_MODES = ("RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
EXIF_ORIENTATION = 0x0112
DICOM_SUFFIXES = (".dcm", ".dicom")
PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def read_image(path: str | Path, frame: int | None = None) -> Image.Image:
    """Decode ``path`` (PNG, JPEG, TIFF, BMP, …, or DICOM) to an 8-bit "L" or "RGB" image.

    ``frame``: which frame of a multi-frame DICOM (default the first). Raises
    :class:`ImageReadError` (missing, truncated, corrupt, unsupported, not a regular file) or
    :class:`DicomError`, both naming the file and the reason.
    """
    p = Path(path)
    if not p.is_file():  # also refuses FIFOs and devices, which an open() would block on
        raise ImageReadError(f"{p}: no such image file. Check the path (or re-run the listing).", str(p))
    if is_dicom_file(p):
        return read_dicom_image(p, frame)
    try:
        with Image.open(p) as img:
            img.load()  # Pillow decodes lazily: truncation only shows up here
            return to_model_mode(img)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{p}: image is implausibly large for a radiograph ({exc}).", str(p)) from None
    except Exception as exc:  # noqa: BLE001 - decoder boundary: any failure on a bad file is the file's fault
        raise ImageReadError(
            f"{p}: cannot decode the image ({type(exc).__name__}: {exc}). The file is truncated, corrupt or "
            "not an image; re-export or remove it.",
            str(p),
        ) from None


def is_dicom_file(path: Path) -> bool:
    """True for a Part-10 file ("DICM" at byte 128) or a ``.dcm``/``.dicom`` file (regular files only)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def to_model_mode(img: Image.Image) -> Image.Image:
    """Apply the documented policy (module docstring): returns 8-bit "L" or "RGB".

    8-bit L and RGB without an EXIF rotation come back as the very same object (parity).
    """
    img = apply_exif_orientation(img)
    mode = img.mode
    try:
        if mode in ("L", "RGB"):
            return img
        if mode in ("LA", "La"):
            return img.getchannel(0)
        if mode == "1":
            return img.convert("L")
        if mode in ("P", "PA"):
            return img.convert("RGBA").convert("RGB")
        if mode in TO_RGB_MODES:
            return img.convert("RGB")
        if mode in HIGH_DEPTH_MODES:
            return Image.fromarray(minmax_to_uint8(np.asarray(img)), mode="L")
    except (ValueError, OSError) as exc:
        raise ImageReadError(f"cannot convert a {mode} image to RGB ({exc}).") from None
    raise ImageReadError(f"unsupported pixel mode {mode!r}; save the image as 8/16-bit grayscale or RGB.")


def apply_exif_orientation(img: Image.Image) -> Image.Image:
    """Rotate/flip by the EXIF orientation tag when it says the stored pixels are not upright."""
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a corrupt EXIF block must not cost the image: ignore the tag
        return img
    if orientation not in range(2, 9):
        return img
    return ImageOps.exif_transpose(img)


def minmax_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale an array linearly from its own finite [min, max] to 0..255 uint8 (rounded).

    The 16-bit/float policy and the DICOM fallback when a file has no window. Non-finite values
    map to 0; a constant image maps to all 0 (there is no contrast to show).
    """
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    if not finite.any():
        return np.zeros(v.shape, np.uint8)
    lo, hi = float(v[finite].min()), float(v[finite].max())
    if hi <= lo:
        return np.zeros(v.shape, np.uint8)
    out = (np.where(finite, v, lo) - lo) * (255.0 / (hi - lo))
    return np.floor(out + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------- DICOM pixels


def _pydicom():
    try:
        import pydicom
    except ImportError:  # pragma: no cover - declared dependency
        raise DependencyError("Reading DICOM needs pydicom: pip install pydicom pylibjpeg pylibjpeg-libjpeg "
                              "pylibjpeg-openjpeg") from None  # fmt: skip
    return pydicom


def read_dicom_image(path: str | Path, frame: int | None = None) -> Image.Image:
    """Decode a DICOM file to an 8-bit "L" (grayscale) or "RGB" image (see :func:`dataset_to_image`)."""
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
        return dataset_to_image(ds, frame)
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


def dataset_to_image(ds: Any, frame: int | None = None) -> Image.Image:
    """Pixels of a pydicom Dataset -> 8-bit PIL image (``frame`` of a multi-frame object, default the first).

    The stored values go through the modality LUT (Rescale Slope/Intercept or a Modality LUT
    Sequence), then the first VOI transform the file carries (VOI LUT Sequence, else Window
    Center/Width with its VOI LUT Function), which is the rendering the modality chose for reading;
    without one, a min-max window over the image's own range (as for 16-bit PNGs). MONOCHROME1 is
    inverted so that bone is always bright. Bits Stored is honoured by pydicom's decoders;
    compressed transfer syntaxes (JPEG, JPEG-LS, JPEG 2000, RLE) decode through the pylibjpeg
    plugins. Colour DICOM becomes 8-bit RGB.
    """
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    frames = int(ds.get("NumberOfFrames", 1) or 1)
    index = frame or 0
    if not 0 <= index < frames:
        raise DicomError(f"frame {index} does not exist (the file has {frames}).")
    arr = ds.pixel_array
    if frames > 1:
        arr = arr[index]
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
