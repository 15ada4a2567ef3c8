"""``MedImageInsight``: the one object the rest of cxr-embed uses to turn images and texts into embeddings.

It always loads strictly (see :mod:`cxr_embed.model.loading`) and always embeds in eval mode, so the
same image gives the same embedding on every call, unlike the official wrapper which stays in
training mode (DropPath on). Embeddings come back as float32 on the CPU whatever the device and
precision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from cxr_embed.errors import ConfigError
from cxr_embed.model.config import UniCLConfig, load_config
from cxr_embed.model.files import (
    CHECKPOINT_RELPATH,
    CONFIG_NAME,
    TOKENIZER_FILES,
    TOKENIZER_RELPATH,
    resolve_model_dir,
    sha256_file,
)
from cxr_embed.model.loading import load_checkpoint
from cxr_embed.model.tokenizer import ClipTokenizer
from cxr_embed.model.unicl import UniCL, l2_normalize
from cxr_embed.precision import autocast, check_precision
from cxr_embed.preprocessing import Preprocessor

#: Published sha256 of the official ``medimageinsigt-v1.0.0.pt`` (from its Git LFS pointer).
OFFICIAL_SHA256 = "5eeda63bf616a61664bc95b2c09d3b3d7125209e635678bd3f5f324e9bdb1414"
OFFICIAL_MODEL_ID = "medimageinsight-v1.0.0"

@dataclass(frozen=True)
class ModelInfo:
    """What ``cxr-embed model info`` reports."""

    model_id: str
    model_dir: str
    checkpoint: str
    checkpoint_sha256: str
    official_weights: bool
    architecture: dict[str, object]
    parameters: dict[str, int]
    embed_dim: int
    device: str
    precision: str
    preprocess_fingerprint: str


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"Unknown device {device!r}: {exc}. Use auto, cpu, cuda or cuda:N.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device {device!r} requested but no CUDA GPU is available; use --device cpu.")
    return resolved


class MedImageInsight:
    """A loaded model: preprocessing settings, tokenizer and the ``UniCL`` module on one device."""

    def __init__(self, module: UniCL, model_dir: Path, checkpoint_sha256: str, device: torch.device,
                 precision: str = "fp32"):
        check_precision(precision, device.type)
        self.module = module
        self.model_dir = model_dir
        self.checkpoint_sha256 = checkpoint_sha256
        self.device = device
        self.precision = precision
        cfg = module.cfg
        self.preprocessor = Preprocessor(image_size=cfg.image.image_size, mean=cfg.image.mean, std=cfg.image.std)
        official = checkpoint_sha256 == OFFICIAL_SHA256
        self.model_id = OFFICIAL_MODEL_ID if official else cfg.slug

    @classmethod
    def load(cls, model_dir: str | Path | None = None, device: str | torch.device = "auto",
             precision: str = "fp32") -> MedImageInsight:
        """Load a model folder strictly (``--model-dir`` > ``$CXR_EMBED_MODEL_DIR`` > pull cache).

        Raises ``ModelNotFoundError``, ``ConfigError`` or ``CheckpointError`` with what to fix.
        """
        folder = resolve_model_dir(model_dir)
        cfg = load_config(folder / CONFIG_NAME)
        missing = [f for f in TOKENIZER_FILES[:2] if not (folder / TOKENIZER_RELPATH / f).is_file()]
        if missing:
            raise ConfigError(f"{folder / TOKENIZER_RELPATH} lacks {', '.join(missing)}; the model folder is "
                              "incomplete (run `cxr-embed model pull`).")
        resolved = resolve_device(device)
        check_precision(precision, resolved.type)  # before reading 2.5 GB
        checkpoint = folder / CHECKPOINT_RELPATH
        with torch.device("meta"):  # no random init of 616 M parameters that are overwritten anyway
            module = UniCL(cfg)
        load_checkpoint(module, checkpoint)
        module.to(resolved).eval()
        return cls(module, folder, sha256_file(checkpoint), resolved, precision)

    @property
    def config(self) -> UniCLConfig:
        return self.module.cfg

    @property
    def embed_dim(self) -> int:
        return self.module.cfg.dim_projection

    def info(self) -> ModelInfo:
        """Architecture, parameter counts per tower, checkpoint identity and placement."""
        cfg = self.config
        img, txt = cfg.image, cfg.text
        arch = {
            "name": cfg.name,
            "image_tower": f"DaViT v1: widths {list(img.dim_embed)}, depths {list(img.depths)}, "
                           f"heads {list(img.num_heads)}, window {img.window_size}",
            "text_tower": f"CLIP transformer: {txt.layers} layers, width {txt.width}, {txt.heads} heads, "
                          f"context {txt.context_length}, vocab {txt.vocab_size}",
            "image_size": img.image_size,
            "image_feature_dim": img.feature_dim,
        }
        return ModelInfo(
            model_id=self.model_id,
            model_dir=str(self.model_dir),
            checkpoint=str(self.model_dir / CHECKPOINT_RELPATH),
            checkpoint_sha256=self.checkpoint_sha256,
            official_weights=self.checkpoint_sha256 == OFFICIAL_SHA256,
            architecture=arch,
            parameters=self.module.parameter_counts(),
            embed_dim=self.embed_dim,
            device=str(self.device),
            precision=self.precision,
            preprocess_fingerprint=self.preprocessor.fingerprint(),
        )

    @cached_property
    def tokenizer(self) -> ClipTokenizer:
        return ClipTokenizer.from_dir(self.model_dir / TOKENIZER_RELPATH, self.config.text.context_length)

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        """Eval mode (each submodule's mode restored afterwards, so a training loop can validate), no grad, autocast."""
        modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        try:
            with torch.no_grad(), autocast(self.device.type, self.precision):
                yield
        finally:
            for module, training in modes:
                module.training = training

    def image_features(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed -> (B, F) pooled features before the projection (float32, CPU)."""
        with self._inference():
            feats = self.module.image_encoder.forward_features(batch.to(self.device))
        return feats.float().cpu()

    def encode_images(self, batch: torch.Tensor, normalize: bool = True, *, keep_on_device: bool = False) -> torch.Tensor:
        """(B, 3, H, W) preprocessed -> (B, D) embeddings, L2-normalised unless ``normalize=False``.

        ``keep_on_device=True`` skips the synchronous copy to CPU, so a pipeline can copy asynchronously
        while the next batch runs (the index job's background writer).
        """
        with self._inference():
            emb = self.module.encode_image(batch.to(self.device), normalize=False)
        emb = emb.float()
        emb = l2_normalize(emb) if normalize else emb
        return emb if keep_on_device else emb.cpu()

    def encode_texts(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Texts -> (T, D) embeddings (CLIP tokenisation, 77 tokens, truncated with EOS kept)."""
        if not texts:
            return torch.empty(0, self.embed_dim)
        tokens = self.tokenizer(list(texts))
        ids = torch.from_numpy(tokens.input_ids).to(self.device)
        mask = torch.from_numpy(tokens.attention_mask).to(self.device)
        with self._inference():
            emb = self.module.encode_text(ids, mask, normalize=False)
        emb = emb.float()
        return (l2_normalize(emb) if normalize else emb).cpu()

    def embed_paths(self, paths: Sequence[str | Path], batch_size: int = 8, normalize: bool = True) -> np.ndarray:
        """Read, preprocess and embed image files -> (N, D) float32. A bad file raises ``ImageReadError``."""
        from cxr_embed.imageio import read_image

        out = np.empty((len(paths), self.embed_dim), dtype=np.float32)
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            batch = torch.stack([self.preprocessor(read_image(p)) for p in chunk])
            out[start : start + len(chunk)] = self.encode_images(batch, normalize=normalize).numpy()
        return out
