"""Image decoding policy: 8-bit L/RGB untouched (reference parity), documented policy for the rest."""

from __future__ import annotations

import functools
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cxr_embed.errors import CxrEmbedError, ImageReadError
from cxr_embed.imageio import minmax_to_uint8, read_image, to_model_mode
from cxr_embed.readers import read_dataset
from cxr_embed.synth import plan_cases, synthetic_dicom

REFERENCE = Path(__file__).parent / "data" / "reference"
FACTS = {
    Path(i["file"]).name: i for i in json.loads((REFERENCE / "preprocessing.json").read_text())["images"]
}


@pytest.mark.parametrize("name", [n for n, f in FACTS.items() if f["accepted"]])
def test_reference_8bit_images_pass_through_pixel_identical(name: str) -> None:
    img = read_image(REFERENCE / "images" / name)
    facts = FACTS[name]
    assert img.mode == facts["pil_mode_on_open"]
    pixels = np.ascontiguousarray(np.asarray(img))
    assert (
        hashlib.sha256(pixels.tobytes()).hexdigest() == facts["decoded_array"]["sha256_of_c_contiguous_bytes"]
    )


def test_reference_16bit_image_is_windowed_not_clipped() -> None:
    path = REFERENCE / "images" / "02_cxr_gray16_2048x2500.png"
    with Image.open(path) as raw:
        values = np.asarray(raw).astype(np.int64)
    img = read_image(path)
    assert img.mode == "L" and img.size == (2048, 2500)
    out = np.asarray(img).astype(np.int64)
    assert out.min() == 0 and out.max() == 255  # full contrast, not a white sheet
    assert (out == 255).mean() < 0.01
    expected = np.floor((values - 1200) * 255 / (60000 - 1200) + 0.5)
    assert np.array_equal(out, expected)  # min-max over the actual range 1200..60000
    order = np.argsort(values.ravel()[::997])
    assert np.all(np.diff(out.ravel()[::997][order]) >= 0)  # monotonic: no wrap-around


def _roundtrip(img: Image.Image, fmt: str = "PNG", **save) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    buf.seek(0)
    return Image.open(buf)


def test_l_and_rgb_are_the_same_object() -> None:
    for mode in ("L", "RGB"):
        img = Image.new(mode, (4, 3))
        assert to_model_mode(img) is img


def test_la_and_rgba_drop_alpha_without_compositing() -> None:
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    alpha = np.full_like(gray, 7)
    la = Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)])
    out = to_model_mode(_roundtrip(la))
    assert out.mode == "L" and np.array_equal(np.asarray(out), gray)
    # the reference converts LA to RGB by dropping alpha: same pixels in every channel
    assert np.array_equal(np.asarray(la.convert("RGB"))[..., 0], np.asarray(out))
    rgb = np.stack([gray, 255 - gray, gray // 2], -1)
    rgba = Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")
    out = to_model_mode(_roundtrip(rgba))
    assert out.mode == "RGB" and np.array_equal(np.asarray(out), rgb)


def test_palette_bilevel_cmyk_become_8bit() -> None:
    pal = Image.new("P", (4, 4))
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal.putpixel((1, 1), 1)
    out = to_model_mode(_roundtrip(pal))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (200, 100, 50) and out.getpixel((0, 0)) == (0, 0, 0)
    bilevel = to_model_mode(_roundtrip(Image.new("1", (4, 4), 1)))
    assert bilevel.mode == "L" and np.all(np.asarray(bilevel) == 255)
    cmyk = to_model_mode(_roundtrip(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "JPEG"))
    assert cmyk.mode == "RGB" and np.all(np.asarray(cmyk) >= 250)  # no ink = white


def test_float_and_int32_images_are_minmax_windowed(tmp_path: Path) -> None:
    values = np.linspace(-3.0, 5.0, 64, dtype=np.float32).reshape(8, 8)
    values[0, 0] = np.nan
    path = tmp_path / "float.tif"
    Image.fromarray(values, mode="F").save(path)
    out = np.asarray(read_image(path))
    assert out[0, 0] == 0 and out[0, 1] == 0 and out[-1, -1] == 255
    assert np.all(np.diff(out.ravel()[1:].astype(int)) >= 0)
    ints = Image.fromarray(np.arange(100_000, 100_064, dtype=np.int32).reshape(8, 8), mode="I")
    out = np.asarray(to_model_mode(ints))
    assert out.min() == 0 and out.max() == 255
    assert np.all(minmax_to_uint8(np.full((3, 3), 7)) == 0)  # constant: no contrast to show


def test_16bit_png_uses_its_own_range(tmp_path: Path) -> None:
    values = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 4 + 300).astype(np.uint16)  # 12-bit-ish data
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
        assert np.all(np.asarray(raw.convert("L")) == 255)  # what the naive conversion would give
    out = np.asarray(read_image(path))
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) == 256


@pytest.mark.parametrize(
    ("orientation", "expected_size"), [(1, (6, 4)), (3, (6, 4)), (6, (4, 6)), (8, (4, 6))]
)
def test_exif_orientation_is_applied(
    tmp_path: Path, orientation: int, expected_size: tuple[int, int]
) -> None:
    arr = np.zeros((4, 6), np.uint8)
    arr[0, 0] = 255  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rot.png"
    Image.fromarray(arr).save(path, exif=exif.tobytes())
    out = read_image(path)
    assert out.mode == "L" and out.size == expected_size
    corner = {1: (0, 0), 3: (5, 3), 6: (3, 0), 8: (0, 5)}[orientation]
    assert out.getpixel(corner) == 255


def test_missing_truncated_and_non_image_files(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="no such image file"):
        read_image(tmp_path / "nope.png")
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ImageReadError, match="truncated.png") as info:
        read_image(truncated)
    assert info.value.path == str(truncated)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ImageReadError, match="cannot decode"):
        read_image(text)


@functools.cache
def _seed_file(kind: str) -> bytes:
    """A small valid file of each decoder's format, to be corrupted."""
    buf = io.BytesIO()
    if kind == "dcm":
        pixels = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 16).astype(np.uint16)
        synthetic_dicom(pixels, plan_cases(1)[0], seed=0).save_as(buf, enforce_file_format=True)
    elif kind == "png":
        Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(buf, format="PNG")
    else:
        Image.fromarray(np.arange(768, dtype=np.uint16).reshape(16, 16, 3).astype(np.uint8)).save(
            buf, format="JPEG"
        )
    return buf.getvalue()


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns loudly about mangled headers
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_decoder_fuzz_only_typed_errors(tmp_path: Path, data: st.DataObject) -> None:
    """Truncated and byte-flipped PNG/JPEG/DICOM files: a typed error or a valid image, never a crash."""
    kind = data.draw(st.sampled_from(["png", "jpg", "dcm"]))
    blob = bytearray(_seed_file(kind))
    keep = 132 if kind == "dcm" else 8  # keep the magic so the right decoder is exercised
    blob = blob[: data.draw(st.integers(keep + 1, len(blob)))]
    for pos, value in data.draw(
        st.lists(st.tuples(st.integers(keep, len(blob) - 1), st.integers(0, 255)), max_size=8)
    ):
        blob[pos] = value
    path = tmp_path / f"fuzz.{kind}"
    path.write_bytes(bytes(blob))
    try:
        img = read_image(path)
        assert img.mode in ("L", "RGB")
    except CxrEmbedError:
        pass
    if kind == "dcm":
        try:
            read_dataset(path, errors=[])
        except CxrEmbedError:
            pass
