"""CLIP-style text transformer (the MedImageInsight ``lang_encoder``).

Differences from OpenAI CLIP that matter for parity: no causal mask (``AUTOGRESSIVE: false``) but a
key-padding mask, TF-style LayerNorm with eps 1e-12 computed in float32, QuickGELU. Parameter
names follow the official checkpoint (``resblocks.i.attn.in_proj_weight`` …).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from cxr_embed.model.config import TextEncoderConfig


class TFLayerNorm(nn.Module):
    """LayerNorm with the epsilon inside the square root, statistics in float32 (eps 1e-12)."""

    def __init__(self, dim: int, eps: float = 1e-12):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        mean = x.mean(-1, keepdim=True)
        var = (x - mean).pow(2).mean(-1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight * x.to(dtype) + self.bias


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter layout (packed q,k,v rows)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = SelfAttention(dim, heads)
        self.ln_1 = TFLayerNorm(dim)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(dim, dim * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(dim * 4, dim)),
        ]))
        self.ln_2 = TFLayerNorm(dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    """Token ids (B, 77) + attention mask -> last hidden state (B, 77, width) after ``ln_final``."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg.width, cfg.heads) for _ in range(cfg.layers))
        self.ln_final = TFLayerNorm(cfg.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def _mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Boolean "may attend" mask (B|1, 1, N, N): causal if autoregressive, else key padding."""
        n = input_ids.shape[1]
        if self.cfg.autoregressive:
            return torch.ones(n, n, dtype=torch.bool, device=input_ids.device).tril()[None, None]
        if attention_mask is None:
            return None
        return attention_mask.bool()[:, None, None, :].expand(-1, 1, n, n)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.token_embedding(input_ids) + self.positional_embedding
        mask = self._mask(input_ids, attention_mask)
        for block in self.resblocks:
            x = block(x, mask)
        return self.ln_final(x)
