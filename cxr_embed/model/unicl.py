"""UniCL: the MedImageInsight ``nn.Module`` (image tower, text tower, two projections, logit_scale)."""

from __future__ import annotations

import torch
from torch import nn

from cxr_embed.model.config import UniCLConfig
from cxr_embed.model.davit import DaViT
from cxr_embed.model.text import TextTransformer


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Divide by the L2 norm with no epsilon, exactly as the reference does."""
    return x / x.norm(dim=-1, keepdim=True)


class UniCL(nn.Module):
    """Both towers of MedImageInsight. Parameter names equal the official checkpoint's keys.

    Projections are used as ``x @ W`` (not transposed), as in the official code.
    """

    def __init__(self, cfg: UniCLConfig):
        super().__init__()
        self.cfg = cfg
        # Registration order reproduces the official state_dict order.
        self.lang_projection = nn.Parameter(torch.empty(cfg.text.width, cfg.dim_projection))
        self.image_projection = nn.Parameter(torch.empty(cfg.image.feature_dim, cfg.dim_projection))
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.lang_encoder = TextTransformer(cfg.text)
        self.image_encoder = DaViT(cfg.image)
        nn.init.trunc_normal_(self.lang_projection, std=0.02)
        nn.init.trunc_normal_(self.image_projection, std=0.02)

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part: image tower, text tower, projections, logit_scale and total."""
        def count(m: nn.Module) -> int:
            return sum(p.numel() for p in m.parameters())

        counts = {
            "image_tower": count(self.image_encoder),
            "text_tower": count(self.lang_encoder),
            "projections": self.image_projection.numel() + self.lang_projection.numel(),
            "logit_scale": self.logit_scale.numel(),
        }
        return {**counts, "total": sum(counts.values())}

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.image_encoder.forward_features(images) @ self.image_projection
        return l2_normalize(x) if normalize else x

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden state at the first end-of-text token (the largest id), before projection."""
        hidden = self.lang_encoder(input_ids, attention_mask)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), input_ids.argmax(dim=-1)]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    normalize: bool = True) -> torch.Tensor:
        x = self.text_features(input_ids, attention_mask) @ self.lang_projection
        return l2_normalize(x) if normalize else x

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image embeddings, text embeddings, exp(logit_scale)), as the official forward returns."""
        return self.encode_image(images), self.encode_text(input_ids, attention_mask), self.logit_scale.exp()
