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
DICOM                     :mod:`cxr_embed.readers.dicom`: modality LUT, VOI LUT/window (else
                          min-max), MONOCHROME1 inverted, -> L (or RGB for colour DICOM)
multi-frame files         the first frame
========================  =================================================================
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from cxr_embed.errors import ImageReadError

POLICY_VERSION = "1"
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
TO_RGB_MODES = ("RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
EXIF_ORIENTATION = 0x0112


def read_image(path: str | Path) -> Image.Image:
    """Decode ``path`` (PNG, JPEG, TIFF, BMP, …, or DICOM) to an 8-bit "L" or "RGB" image.

    Raises :class:`ImageReadError` (missing, truncated, corrupt, unsupported) or
    :class:`DicomError`, both naming the file and the reason.
    """
    from cxr_embed.readers.dicom import is_dicom_file, read_dicom_image

    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"{p}: no such image file. Check the path (or re-run the listing).", str(p))
    if is_dicom_file(p):
        return read_dicom_image(p)
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
