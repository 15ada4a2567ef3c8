"""The reimplemented MedImageInsight reproduces the official code's outputs on the tiny fixture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cxr_embed.errors import ConfigError, ModelNotFoundError
from cxr_embed.model import MedImageInsight, resolve_model_dir, tiny_model_dir
from cxr_embed.model.config import full_config, load_config
from cxr_embed.model.davit import DaViT
from cxr_embed.model.files import CHECKPOINT_RELPATH, sha256_file
from cxr_embed.model.loading import manifest_of
from cxr_embed.model.unicl import UniCL

REF = Path(__file__).parent / "data" / "reference"


def ref(name: str) -> np.ndarray:
    return np.load(REF / name)


def max_diff(a: torch.Tensor | np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float32) - b).max())


@pytest.fixture(scope="module")
def image_outputs(tiny_model, reference_batch):
    """One public ``encode_images`` pass over the 4 reference images; hooks capture stage outputs and features."""
    tower = tiny_model.module.image_encoder
    captured: dict[str, torch.Tensor] = {}
    hooks = [stage.register_forward_hook(lambda _m, _i, out, i=i: captured.__setitem__(f"stage{i}_out", out))
             for i, stage in enumerate(tower.blocks, start=1)]
    hooks.append(tower.norms.register_forward_hook(lambda _m, _i, out: captured.__setitem__("features", out)))
    try:
        embeddings = tiny_model.encode_images(reference_batch)
    finally:
        for hook in hooks:
            hook.remove()
    return captured, embeddings


def test_stage_outputs_match_reference(image_outputs):
    expected = load_file(REF / "image0_stage_outputs.safetensors")
    for i in range(1, 5):
        out = image_outputs[0][f"stage{i}_out"][:1]
        assert out.shape == expected[f"stage{i}_out"].shape
        assert max_diff(out, expected[f"stage{i}_out"].numpy()) < 1e-4, f"stage {i}"


def test_image_features_and_embeddings_match_reference(image_outputs):
    features, embeddings = image_outputs[0]["features"], image_outputs[1]
    assert features.shape == (4, 128) and embeddings.shape == (4, 32) and embeddings.dtype == torch.float32
    assert max_diff(features, ref("image_features.npy")) < 1e-4
    assert max_diff(embeddings, ref("image_embeddings.npy")) <= 1e-5


def test_embed_paths_reads_preprocesses_and_embeds(tiny_model):
    out = tiny_model.embed_paths([REF / "images" / "04_tiny_gray8_60x40.png"])
    assert out.dtype == np.float32 and out.shape == (1, 32)
    assert max_diff(out, ref("image_embeddings.npy")[2:3]) <= 1e-5


def test_text_tower_matches_reference(tiny_model):
    texts = json.loads((REF / "texts.json").read_text(encoding="utf-8"))["texts"]
    ids = torch.from_numpy(ref("input_ids.npy"))
    mask = torch.from_numpy(ref("attention_mask.npy"))
    with torch.no_grad():
        hidden = tiny_model.module.lang_encoder(ids, mask).numpy()
        pooled = tiny_model.module.text_features(ids, mask)
    real = ref("attention_mask.npy") == 1
    assert np.abs(hidden - ref("text_last_hidden_state.npy"))[real].max() < 1e-4
    assert max_diff(pooled, ref("text_pooled_features.npy")) < 1e-4
    assert max_diff(tiny_model.encode_texts(texts), ref("text_embeddings.npy")) <= 1e-5


def test_logits_match_reference(tiny_model, image_outputs):
    texts = json.loads((REF / "texts.json").read_text(encoding="utf-8"))["texts"]
    scale = tiny_model.module.logit_scale.exp().item()
    assert scale == pytest.approx(json.loads((REF / "logit_scale.json").read_text())["exp_logit_scale"], rel=1e-6)
    logits = image_outputs[1] @ tiny_model.encode_texts(texts).T * scale
    assert max_diff(logits, ref("logits_per_image.npy")) < 1e-3


def test_embeddings_are_deterministic_and_eval_mode_is_restored(tiny_model, reference_batch):
    """Train mode left on by a caller must not leak into embeddings (the official wrapper's DropPath bug).

    A 96x96 crop keeps this cheap; the architecture accepts any size.
    """
    module = tiny_model.module
    x = reference_batch[:1, :, 100:196, 100:196]
    module.train()
    module.image_encoder.norms.eval()  # a caller's per-submodule modes must come back as they were
    try:
        raw = tiny_model.encode_images(x, normalize=False)
        features = tiny_model.image_features(x)
        assert module.training and not module.image_encoder.norms.training, "the caller's modes must be restored"
    finally:
        module.eval()
    first, second = tiny_model.encode_images(x), tiny_model.encode_images(x)
    assert torch.equal(first, second)
    assert features.shape == (1, 128)
    assert max_diff(raw, (features @ module.image_projection.detach()).numpy()) < 1e-5
    assert raw.norm() > 1.5 and max_diff(raw / raw.norm(dim=-1, keepdim=True), first.numpy()) < 1e-6


def test_bf16_autocast_stays_close(tiny_model, reference_batch, image_outputs):
    bf16 = MedImageInsight(tiny_model.module, tiny_model.model_dir, tiny_model.checkpoint_sha256,
                           tiny_model.device, precision="bf16")
    out = bf16.encode_images(reference_batch[:1])
    assert out.dtype == torch.float32
    assert 0 < max_diff(out, image_outputs[1][:1].numpy()) < 3e-2  # reference itself: 3.5e-3


@pytest.mark.gpu
def test_cuda_fp32_and_autocast_match_reference(tiny_model, reference_batch):
    expected = ref("image_embeddings.npy")
    for precision, tol in (("fp32", 1e-3), ("bf16", 3e-2), ("fp16", 1e-2)):  # TF32 convs allowed on GPU
        model = MedImageInsight.load(tiny_model_dir(), device="cuda", precision=precision)
        out = model.encode_images(reference_batch)
        assert out.device.type == "cpu" and out.dtype == torch.float32
        assert max_diff(out, expected) < tol, precision


def test_fp16_on_cpu_and_bad_precision_are_refused(tiny_model):
    for precision in ("fp16", "int8"):
        with pytest.raises(ConfigError, match="precision|fp16"):
            MedImageInsight(tiny_model.module, tiny_model.model_dir, "0" * 64, torch.device("cpu"), precision)


def test_identity_attributes(tiny_model):
    assert tiny_model.embed_dim == 32
    assert tiny_model.model_id == "cxr-embed-tiny-parity-fixture"
    assert tiny_model.checkpoint_sha256 == sha256_file(tiny_model_dir() / CHECKPOINT_RELPATH)
    assert tiny_model.device == torch.device("cpu") and not tiny_model.module.training
    assert tiny_model.encode_texts([]).shape == (0, 32)


def test_full_size_config_builds_the_official_state_dict_on_meta():
    manifest = json.loads((REF / "full-v1.0.0-manifest.json").read_text())
    with torch.device("meta"):
        module = UniCL(full_config())
    assert manifest_of(module) == manifest["state_dict"]  # keys, order, shapes and dtypes
    counts = module.parameter_counts()
    assert counts["total"] == 615_996_417 == manifest["param_counts"]["total"]
    assert counts["image_tower"] == manifest["param_counts"]["image_tower (image_encoder.*)"]
    assert counts["text_tower"] == manifest["param_counts"]["text_tower (lang_encoder.*)"]


@pytest.mark.slow  # a backward pass through the image tower, twice (~30 s on a loaded 2-core machine)
def test_image_tower_trains_with_gradient_checkpointing():
    """forward_features is differentiable; checkpointing (DropPath on, same RNG) changes nothing."""
    tower = DaViT(load_config(tiny_model_dir() / "config.yaml").image).train()
    x = torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    grads = []
    for flag in (False, True):
        tower.set_grad_checkpointing(flag)
        tower.zero_grad()
        with torch.random.fork_rng():
            torch.manual_seed(1)
            tower.forward_features(x).square().sum().backward()
        grads.append(tower.convs[0].proj.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_resolve_model_dir_order(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_EMBED_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CXR_EMBED_MODEL_DIR", raising=False)
    with pytest.raises(ModelNotFoundError, match="cxr-embed model pull"):
        resolve_model_dir(None)
    monkeypatch.setenv("CXR_EMBED_MODEL_DIR", str(tiny_model_dir()))
    assert resolve_model_dir(None) == tiny_model_dir()
    with pytest.raises(ModelNotFoundError, match="config.yaml is missing"):
        resolve_model_dir(tmp_path)  # the option wins over the env var
    monkeypatch.setenv("CXR_EMBED_MODEL_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ModelNotFoundError, match="CXR_EMBED_MODEL_DIR"):
        resolve_model_dir(None)
