"""DaViT v1 image tower (dual attention: window attention then channel attention per depth unit).

Written from the architecture facts recorded with the reference data (see ``docs/ARCHITECTURE.md``
and the model README section). Module and parameter names follow the official checkpoint
(``convs.i.proj``, ``blocks.i.j.spatial_block.window_attn.fn.qkv`` …) so its state dict loads 1:1.

Numerical details that matter for parity with the official embeddings:
- every sub-block is ``x + conv(x)``, ``x + attn(LN(x))``, ``x + conv(x)``, ``x + MLP(LN(x))``;
- window attention zero-pads the *normed* tokens at the bottom/right and does not mask the padding;
- channel attention scales by ``N ** -0.5`` (N = number of tokens), not by the head size;
- exact (erf) GELU, LayerNorm eps 1e-5, mean pooling then LayerNorm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cxr_embed.model.config import ImageEncoderConfig

Size = tuple[int, int]


class DropPath(nn.Module):
    """Stochastic depth on the residual branch; identity in eval mode (so embeddings are deterministic)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class ConvEmbed(nn.Module):
    """Patch embedding: optional LayerNorm on incoming tokens (pre-norm) or on the output (post-norm)."""

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int, padding: int, pre_norm: bool):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=kernel, stride=stride, padding=padding)
        self.pre_norm = pre_norm
        self.norm = nn.LayerNorm(in_chans if pre_norm else dim)

    def forward(self, x: torch.Tensor, size: Size) -> tuple[torch.Tensor, Size]:
        if x.ndim == 3:  # tokens (B, N, C) from the previous stage
            if self.pre_norm:
                x = self.norm(x)
            x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], size[0], size[1])
        x = self.proj(x)
        h, w = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)
        if not self.pre_norm:
            x = self.norm(x)
        return x, (h, w)


class DepthWiseConv2d(nn.Module):
    """3x3 depthwise conv over the token map: DaViT's only source of position information."""

    def __init__(self, dim: int):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        b, n, c = x.shape
        x = self.dw(x.transpose(1, 2).reshape(b, c, size[0], size[1]))
        return x.flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential()
        self.net.add_module("fc1", nn.Linear(dim, hidden))
        self.net.add_module("act", nn.GELU())
        self.net.add_module("fc2", nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        return self.net(x)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping ``window x window`` token windows."""

    def __init__(self, dim: int, num_heads: int, window_size: int):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        h, w = size
        b, _, c = x.shape
        ws = self.window_size
        x = x.view(b, h, w, c)
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))  # zeros; deliberately not masked (as the reference)
        hp, wp = h + pad_b, w + pad_r
        x = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        bw, n, _ = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        x = self.proj(x.transpose(1, 2).reshape(bw, n, c))
        x = x.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        return x[:, :h, :w, :].reshape(b, h * w, c)


class ChannelAttention(nn.Module):
    """Attention between channels within each of G groups; the N tokens play the role of features."""

    def __init__(self, dim: int, groups: int):
        super().__init__()
        self.groups = groups
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.groups, c // self.groups).permute(2, 0, 3, 4, 1)
        # (B, G, C/G, N): softmax(q^T k * N^-0.5) v^T, i.e. attention over channels with N as "head dim".
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=n**-0.5)
        return self.proj(out.permute(0, 3, 1, 2).reshape(b, n, c))


class PreNorm(nn.Module):
    """Residual wrapper ``x + drop_path(fn(norm(x)))``; ``norm`` is None for the conv steps."""

    def __init__(self, norm: nn.Module | None, fn: nn.Module, drop_path: float = 0.0):
        super().__init__()
        self.norm = norm
        self.fn = fn
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        y = self.norm(x) if self.norm is not None else x
        return x + self.drop_path(self.fn(y, size))


class SpatialBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.conv1 = PreNorm(None, DepthWiseConv2d(dim))
        self.window_attn = PreNorm(nn.LayerNorm(dim), WindowAttention(dim, heads, window), drop_path)
        self.conv2 = PreNorm(None, DepthWiseConv2d(dim))
        self.ffn = PreNorm(nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio)), drop_path)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        return self.ffn(self.conv2(self.window_attn(self.conv1(x, size), size), size), size)


class ChannelBlock(nn.Module):
    def __init__(self, dim: int, groups: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.conv1 = PreNorm(None, DepthWiseConv2d(dim))
        self.channel_attn = PreNorm(nn.LayerNorm(dim), ChannelAttention(dim, groups), drop_path)
        self.conv2 = PreNorm(None, DepthWiseConv2d(dim))
        self.ffn = PreNorm(nn.LayerNorm(dim), Mlp(dim, int(dim * mlp_ratio)), drop_path)

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        return self.ffn(self.conv2(self.channel_attn(self.conv1(x, size), size), size), size)


class DualBlock(nn.Module):
    """One depth unit: a spatial (window) block followed by a channel block."""

    def __init__(self, spatial_block: SpatialBlock, channel_block: ChannelBlock):
        super().__init__()
        self.spatial_block = spatial_block
        self.channel_block = channel_block

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        return self.channel_block(self.spatial_block(x, size), size)


class Stage(nn.ModuleList):
    """The depth units of one stage (a list, so keys read ``blocks.<stage>.<unit>.…``)."""

    def forward(self, x: torch.Tensor, size: Size) -> torch.Tensor:
        for block in self:
            x = block(x, size)
        return x


class DaViT(nn.Module):
    """The MedImageInsight image tower. ``forward_features`` gives the pooled (B, F) features.

    For fine-tuning: ``set_grad_checkpointing(True)`` recomputes each stage in the backward pass
    (no numerical effect, much less activation memory at 480x480); DropPath is active in train mode.
    """

    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        self.cfg = cfg
        n_units = sum(cfg.depths)
        rates = [cfg.drop_path_rate * i / max(2 * n_units - 1, 1) for i in range(2 * n_units)]  # linear 0 -> max
        self.convs = nn.ModuleList()
        self.blocks = nn.ModuleList()
        in_chans, unit = 3, 0
        for i, dim in enumerate(cfg.dim_embed):
            self.convs.append(ConvEmbed(in_chans, dim, cfg.patch_size[i], cfg.patch_stride[i],
                                        cfg.patch_padding[i], cfg.patch_prenorm[i]))
            stage = Stage()
            for _ in range(cfg.depths[i]):
                stage.append(DualBlock(
                    SpatialBlock(dim, cfg.num_heads[i], cfg.window_size, cfg.mlp_ratio, rates[2 * unit]),
                    ChannelBlock(dim, cfg.num_groups[i], cfg.mlp_ratio, rates[2 * unit + 1]),
                ))
                unit += 1
            self.blocks.append(stage)
            in_chans = dim
        self.norms = nn.LayerNorm(cfg.feature_dim)
        self.grad_checkpointing = False

    @property
    def num_features(self) -> int:
        return self.cfg.feature_dim

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute stage activations during backward to save memory (training only)."""
        self.grad_checkpointing = enable

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Token sequences (B, H*W, C) after each stage's blocks, row-major over the token grid."""
        size: Size = (x.shape[2], x.shape[3])
        outs = []
        for conv, stage in zip(self.convs, self.blocks, strict=True):
            x, size = conv(x, size)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(stage, x, size, use_reentrant=False)
            else:
                x = stage(x, size)
            outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed images -> (B, F) mean-pooled, LayerNormed features."""
        return self.norms(self.stage_outputs(x)[-1].mean(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)
