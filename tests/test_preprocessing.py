"""Preprocessing must equal the official eval path bit for bit on 8-bit L/RGB inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_embed.preprocessing import Preprocessor

REF = Path(__file__).parent / "data" / "reference"
ACCEPTED = ("01_cxr_gray8_1024x1024.png", "03_rgb_800x600.jpg", "04_tiny_gray8_60x40.png",
            "05_wide_gray8_1600x100.png")
REFERENCE_TENSOR_SHA256 = "11f6b711e4567dd91b146237672209c49c8af101762b4447ebc1581b0a5cde18"


def test_golden_tensor_is_the_reference_bit_for_bit(reference_batch):
    assert reference_batch.shape == (4, 3, 480, 480)
    assert hashlib.sha256(reference_batch.numpy().tobytes()).hexdigest() == REFERENCE_TENSOR_SHA256


def test_decoded_pixels_match_the_reference_decoder():
    """Rules out a JPEG/PNG decoder difference before blaming the resize."""
    facts = {Path(i["file"]).name: i for i in json.loads((REF / "preprocessing.json").read_text())["images"]}
    for name in ACCEPTED:
        arr = np.ascontiguousarray(np.asarray(Image.open(REF / "images" / name)))
        assert hashlib.sha256(arr.tobytes()).hexdigest() == facts[name]["decoded_array"]["sha256_of_c_contiguous_bytes"]


@pytest.mark.parametrize("row,name", list(enumerate(ACCEPTED)))
def test_matches_reference_exactly(reference_batch, row, name):
    out = Preprocessor()(Image.open(REF / "images" / name))
    assert out.dtype == reference_batch.dtype and out.shape == (3, 480, 480)
    assert float((out - reference_batch[row]).abs().max()) == 0.0


def test_gray_with_alpha_drops_alpha_like_the_reference():
    gray = Image.open(REF / "images" / "04_tiny_gray8_60x40.png")
    la = gray.convert("LA")
    la.putalpha(Image.new("L", gray.size, 7))  # alpha must be ignored, not composited
    assert (Preprocessor()(la) == Preprocessor()(gray)).all()


def test_fingerprint_is_stable_and_tracks_settings():
    fp = Preprocessor().fingerprint()
    assert fp == Preprocessor().fingerprint() and len(fp) == 16
    assert Preprocessor(image_size=448).fingerprint() != fp
    assert Preprocessor(interpolation="bilinear").fingerprint() != fp


def test_unknown_interpolation_is_refused():
    with pytest.raises(ValueError, match="interpolation"):
        Preprocessor(interpolation="lanczos")


def test_other_modes_follow_the_imageio_policy_instead_of_crashing():
    """The reference crashes on 16-bit; we delegate to the documented decode policy (no clipping to white)."""
    from cxr_embed.imageio import to_model_mode

    img16 = Image.open(REF / "images" / "02_cxr_gray16_2048x2500.png")
    assert img16.mode.startswith("I")
    out = Preprocessor()(img16)
    assert torch.equal(out, Preprocessor()(to_model_mode(img16)))
    assert out.shape == (3, 480, 480) and float(out.std()) > 0.1  # not a constant (all-white) image
