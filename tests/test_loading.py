"""The loader is strict: any checkpoint that would give a partly random model is refused by name."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cxr_embed.errors import CheckpointError
from cxr_embed.model import MedImageInsight, tiny_model_dir
from cxr_embed.model.files import CHECKPOINT_RELPATH, CONFIG_NAME, TOKENIZER_RELPATH
from cxr_embed.model.loading import rename_legacy_key

# current name fragment -> legacy (old DaViT / CLIP-wrapper) fragment
_LEGACY_DAVIT = (
    ("spatial_block.conv1.fn.dw", "0.cpe.0.proj"), ("spatial_block.window_attn.fn", "0.attn"),
    ("spatial_block.conv2.fn.dw", "0.cpe.1.proj"), ("spatial_block.ffn.fn.net", "0.mlp"),
    ("spatial_block.window_attn.norm", "0.norm1"), ("spatial_block.ffn.norm", "0.norm2"),
    ("channel_block.conv1.fn.dw", "1.cpe.0.proj"), ("channel_block.channel_attn.fn", "1.attn"),
    ("channel_block.conv2.fn.dw", "1.cpe.1.proj"), ("channel_block.ffn.fn.net", "1.mlp"),
    ("channel_block.channel_attn.norm", "1.norm1"), ("channel_block.ffn.norm", "1.norm2"),
)


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    return load_file(tiny_model_dir() / CHECKPOINT_RELPATH)


def model_dir_with(tmp_path: Path, tensors: dict[str, torch.Tensor] | None) -> Path:
    """An official-layout folder holding ``tensors`` as its checkpoint (None: no checkpoint file)."""
    folder = tmp_path / "model"
    (folder / "vision_model").mkdir(parents=True)
    shutil.copy(tiny_model_dir() / CONFIG_NAME, folder / CONFIG_NAME)
    (folder / "language_model").mkdir()
    (folder / TOKENIZER_RELPATH).symlink_to(tiny_model_dir() / TOKENIZER_RELPATH, target_is_directory=True)
    if tensors is not None:
        save_file(tensors, str(folder / CHECKPOINT_RELPATH))
    return folder


def load_error(folder: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        MedImageInsight.load(folder, device="cpu")
    return str(info.value)


def test_missing_key_is_named(tmp_path, tensors):
    broken = {k: v for k, v in tensors.items() if k != "image_encoder.norms.weight"}
    message = load_error(model_dir_with(tmp_path, broken))
    assert "missing keys (1): image_encoder.norms.weight" in message


def test_unexpected_key_is_named(tmp_path, tensors):
    message = load_error(model_dir_with(tmp_path, {**tensors, "image_encoder.head.weight": torch.zeros(2, 2)}))
    assert "unexpected keys (1): image_encoder.head.weight" in message


def test_wrong_shape_is_named(tmp_path, tensors):
    message = load_error(model_dir_with(tmp_path, {**tensors, "lang_projection": torch.zeros(5, 5)}))
    assert "wrong shapes (1): lang_projection [5, 5] (model expects [32, 32])" in message


def test_non_float32_tensor_is_named(tmp_path, tensors):
    message = load_error(model_dir_with(tmp_path, {**tensors, "logit_scale": tensors["logit_scale"].half()}))
    assert "not float32 (1): logit_scale float16" in message


def test_pickle_is_refused_without_unpickling(tmp_path, tensors):
    folder = model_dir_with(tmp_path, None)
    torch.save(tensors, folder / CHECKPOINT_RELPATH)
    assert "pickle" in load_error(folder)


def test_garbage_file_is_not_safetensors(tmp_path):
    folder = model_dir_with(tmp_path, None)
    (folder / CHECKPOINT_RELPATH).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    assert "not a safetensors file" in load_error(folder)


def test_missing_file_is_named(tmp_path):
    message = load_error(model_dir_with(tmp_path, None))
    assert "Checkpoint not found" in message and "medimageinsigt-v1.0.0.pt" in message


def test_wrong_prefix_gets_a_hint(tmp_path, tensors):
    message = load_error(model_dir_with(tmp_path, {f"module.{k}": v for k, v in tensors.items()}))
    assert "missing keys (209)" in message and "prefix" in message


def legacy_name(key: str) -> str:
    if key in ("image_projection", "lang_projection"):
        return {"image_projection": "vision_projection", "lang_projection": "text_projection"}[key]
    if key.startswith("lang_encoder."):
        return "text." + key[len("lang_encoder."):]
    if not key.startswith("image_encoder."):
        return key
    key = "visual." + key[len("image_encoder."):]
    key = key.replace("visual.convs.", "visual.conv_embeds.").replace("visual.blocks.", "visual.main_blocks.")
    for current, old in _LEGACY_DAVIT:
        key = key.replace(current, old)
    return key


def test_legacy_names_load_exactly(tmp_path, tensors, tiny_model):
    legacy = {legacy_name(k): v for k, v in tensors.items()}
    assert "visual.main_blocks.2.1.1.attn.qkv.weight" in legacy and "text.ln_final.bias" in legacy
    model = MedImageInsight.load(model_dir_with(tmp_path, legacy), device="cpu")
    loaded, reference = model.module.state_dict(), tiny_model.module.state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_legacy_and_current_name_together_is_refused(tmp_path, tensors):
    both = {**tensors, "vision_projection": tensors["image_projection"].clone()}
    assert "both a legacy and a current name" in load_error(model_dir_with(tmp_path, both))


@pytest.mark.parametrize("old,new", [
    ("visual.main_blocks.2.10.1.attn.qkv.weight", "image_encoder.blocks.2.10.channel_block.channel_attn.fn.qkv.weight"),
    ("visual.main_blocks.0.0.0.mlp.fc2.bias", "image_encoder.blocks.0.0.spatial_block.ffn.fn.net.fc2.bias"),
    ("image_encoder.conv_embeds.3.norm.weight", "image_encoder.convs.3.norm.weight"),
    ("image_encoder.blocks.1.0.spatial_block.conv1.fn.dw.weight", "image_encoder.blocks.1.0.spatial_block.conv1.fn.dw.weight"),
    ("text.resblocks.0.ln_1.weight", "lang_encoder.resblocks.0.ln_1.weight"),
    ("logit_scale", "logit_scale"),
])
def test_rename_legacy_key(old, new):
    assert rename_legacy_key(old) == new
