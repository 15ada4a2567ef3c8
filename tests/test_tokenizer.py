"""Our CLIP tokenizer gives the reference's ids and masks (transformers' slow CLIPTokenizer + ftfy)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cxr_embed.errors import ConfigError
from cxr_embed.model import tiny_model_dir
from cxr_embed.model.files import TOKENIZER_RELPATH
from cxr_embed.model.tokenizer import ClipTokenizer

REF = Path(__file__).parent / "data" / "reference"


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer.from_dir(tiny_model_dir() / TOKENIZER_RELPATH)


@pytest.fixture(scope="module")
def texts() -> dict:
    return json.loads((REF / "texts.json").read_text(encoding="utf-8"))


def test_ids_and_masks_equal_reference(tokenizer, texts):
    batch = tokenizer(texts["texts"])
    assert batch.input_ids.dtype == np.int64 and batch.input_ids.shape == (6, 77)
    np.testing.assert_array_equal(batch.input_ids, np.load(REF / "input_ids.npy"))
    np.testing.assert_array_equal(batch.attention_mask, np.load(REF / "attention_mask.npy"))


def test_bpe_tokens_equal_reference(tokenizer, texts):
    for text, detail in zip(texts["texts"], texts["details"], strict=True):
        assert ["<|startoftext|>", *tokenizer.tokenize(text), "<|endoftext|>"] == detail["bpe_tokens"]


def test_truncation_keeps_eos_last(tokenizer):
    batch = tokenizer(["effusion " * 200])
    assert batch.input_ids[0, 0] == 49406 and batch.input_ids[0, -1] == 49407
    assert batch.attention_mask.sum() == 77


def test_empty_text_is_bos_eos_then_padding(tokenizer):
    batch = tokenizer([""])
    assert batch.input_ids[0, :3].tolist() == [49406, 49407, 49407]
    assert batch.attention_mask[0].tolist() == [1, 1] + [0] * 75
    assert tokenizer.vocab_size == 49408


def test_missing_files_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match="merges.txt"):
        (tmp_path / "vocab.json").write_text("{}")
        ClipTokenizer.from_dir(tmp_path)
