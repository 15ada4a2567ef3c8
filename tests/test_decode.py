"""The shared decode stage: uint8 resize output, normalisation bitwise as the reference, failures as data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_embed.decode import DecodedBatch, decode_image, make_loader
from cxr_embed.preprocessing import Preprocessor
from cxr_embed.readers import read_dataset
from cxr_embed.records import ReadFailure

REF = Path(__file__).parent / "data" / "reference"


def test_normalising_uint8_levels_on_the_device_is_the_reference_tensor_bit_for_bit(reference_batch) -> None:
    levels = torch.from_numpy(np.load(REF / "preprocessed_uint8.npz")["levels"])
    assert levels.dtype == torch.uint8
    assert torch.equal(Preprocessor().normalize(levels), reference_batch)  # the whole batch at once


def test_decode_gives_the_resize_output_that_preprocessing_normalises(synth_cxr14: Path) -> None:
    pre = Preprocessor()
    path = read_dataset(synth_cxr14)[0].path
    pixels = decode_image(path, pre)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 480, 480)
    assert torch.equal(pre.normalize(pixels), pre(Image.open(path)))


def test_loader_keeps_order_and_returns_bad_files_as_decode_failures(
    synth_cxr14: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    shutil.copytree(synth_cxr14, src)
    records = read_dataset(src)[:6]
    Path(records[1].path).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Path(records[4].path).unlink()
    pre = Preprocessor(image_size=64)

    batches = list(make_loader(records, pre, batch_size=4, workers=1))
    assert all(isinstance(b, DecodedBatch) for b in batches)
    assert [b.indices for b in batches] == [[0, 2, 3], [5]]
    failures = [f for b in batches for f in b.failures]
    assert all(isinstance(f, ReadFailure) and f.stage == "decode" for f in failures)
    assert [f.image_id for f in failures] == [records[1].image_id, records[4].image_id]
    assert batches[0].pixels.dtype == torch.uint8 and batches[0].pixels.shape == (3, 3, 64, 64)
    assert torch.equal(batches[1].pixels[0], decode_image(records[5].path, pre))

    explicit = list(make_loader(records, pre, batches=[[5, 0], [2]]))
    assert [b.indices for b in explicit] == [[5, 0], [2]]
    with pytest.raises(ValueError, match="exactly one of"):
        make_loader(records, pre)
