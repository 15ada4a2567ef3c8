"""The trainable network and its optimisation: head, frozen stages, AdamW groups, schedule, EMA,
augmentation (all pure functions of the step, so a resumed run repeats them exactly)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxr_embed.errors import ConfigError

#: Parameter-name patterns without weight decay: the reference's NO_WEIGHT_DECAY_MODULES (dw, norm) and
#: WEIGHT_DECAY_PATTERNS (biases, logit_scale, positional/token embeddings).
NO_DECAY_PATTERNS = (
    r"(^|\.)dw\.",
    r"(^|\.)norms?\.",
    r"(^|\.)norm\d*\.",
    r"\.bias$",
    r"^bias$",
    r"logit_scale",
    r"positional_embedding",
    r"token_embedding",
    r"(^|\.)ln_",
)


# --------------------------------------------------------------------------------------- optimisation


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """True for norms, biases, depthwise convs, ``logit_scale`` and embeddings (the reference's rules).

    Any 1-D or scalar parameter is also exempt: those are gains and offsets whatever their name.
    """
    return param.ndim <= 1 or any(re.search(p, name) for p in NO_DECAY_PATTERNS)


def param_groups(
    named: Sequence[tuple[str, torch.Tensor]], weight_decay: float, head_lr_scale: float = 1.0
) -> list[dict[str, Any]]:
    """AdamW parameter groups: ``[decay, no_decay]`` over the trainable tower parameters, names kept for checks,
    then the same two for the classification head (``head.*``) when there is one.

    Each group carries ``lr_scale`` (the head's is ``head_lr_scale``): a freshly initialised head
    learns slowly at the tower's small learning rate, so users may give it a larger one.
    """
    buckets: dict[tuple[bool, bool], list[tuple[str, torch.Tensor]]] = {
        (h, d): [] for h in (False, True) for d in (True, False)
    }
    for name, p in named:
        if p.requires_grad:
            buckets[(name.startswith("head."), not no_weight_decay(name, p))].append((name, p))
    return [
        {
            "params": [p for _, p in items],
            "names": [n for n, _ in items],
            "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": head_lr_scale if head else 1.0,
        }
        for (head, decay), items in buckets.items()
        if not head or items
    ]


def lr_at(step: int, total: int, warmup: int, base: float, minimum: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up to ``base``, then cosine to ``minimum``.

    A pure function of the step, so a resumed run needs no scheduler object to restore.
    """
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return minimum + (base - minimum) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(total: int, fraction: float) -> int:
    return max(1, int(round(total * fraction)))


class EMA:
    """Exponential moving average of the trainable weights (float32 shadow on the weights' device)."""

    def __init__(self, named: Sequence[tuple[str, torch.Tensor]], decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in named if p.requires_grad}

    def update(self, named: Sequence[tuple[str, torch.Tensor]]) -> None:
        with torch.no_grad():
            for n, p in named:
                if n in self.shadow:
                    self.shadow[n].mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    @contextmanager
    def applied(self, module: nn.Module) -> Iterator[None]:
        """Temporarily load the EMA weights into ``module`` (for evaluation and export)."""
        params = dict(module.named_parameters())
        backup = {n: params[n].detach().clone() for n in self.shadow}
        with torch.no_grad():
            for n, t in self.shadow.items():
                params[n].copy_(t)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, t in backup.items():
                    params[n].copy_(t)


# --------------------------------------------------------------------------------------- augmentation


def augment_batch(
    x: torch.Tensor,
    generator: torch.Generator,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    max_rotation_deg: float = 7.0,
    scale: tuple[float, float] = (0.9, 1.1),
    brightness: float = 0.1,
    contrast: float = 0.1,
    hflip: bool = False,
) -> torch.Tensor:
    """Random small rotation, zoom, brightness and contrast of a preprocessed batch (B, 3, H, W).

    Works in pixel space (mean/std undone, then redone) so that the area rotated in is black like a
    film border and brightness means what it says. No horizontal flip unless asked: the heart is on
    the left, and a flipped film is a different (dextrocardia) anatomy. All draws come from
    ``generator`` so a resumed run repeats them exactly.
    """
    b = x.shape[0]
    dev = x.device
    m = torch.tensor(mean, dtype=x.dtype, device=dev).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=dev).view(1, -1, 1, 1)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(b, generator=generator)).to(dev, x.dtype)

    angle = uniform(-max_rotation_deg, max_rotation_deg) * (math.pi / 180.0)
    zoom = uniform(*scale)
    flip = (torch.rand(b, generator=generator) < 0.5).to(dev, x.dtype) * 2 - 1 if hflip else None
    gain = uniform(1.0 - contrast, 1.0 + contrast)
    shift = uniform(-brightness, brightness)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [
            torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
            torch.stack([sin, cos, torch.zeros_like(cos)], 1),
        ],
        1,
    )
    if flip is not None:
        theta[:, :, 0] = theta[:, :, 0] * flip.view(-1, 1)
    pixels = x * s + m
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    pixels = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mu = pixels.mean(dim=(1, 2, 3), keepdim=True)
    pixels = ((pixels - mu) * gain.view(-1, 1, 1, 1) + mu + shift.view(-1, 1, 1, 1)).clamp(0.0, 1.0)
    return (pixels - m) / s


def step_generator(seed: int, global_step: int, micro: int) -> torch.Generator:
    """The augmentation RNG of one micro-batch: a function of (seed, step, micro-batch) only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + global_step * 1_009 + micro) % (2**63 - 1))


# --------------------------------------------------------------------------------------- model


class FineTuneNet(nn.Module):
    """``encoder.forward_features`` → linear head; parameter names ``encoder.*`` and ``head.*``.

    The head starts at zero weights and the prior log-odds as bias: every image starts at the base
    rate, and no random head sends random gradients into the pretrained tower in the first steps.
    """

    def __init__(self, encoder: nn.Module, feature_dim: int, n_targets: int, prior: np.ndarray | None = None):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(feature_dim, n_targets)
        nn.init.zeros_(self.head.weight)
        p = np.clip(
            np.asarray(prior if prior is not None else [0.5] * n_targets, dtype=np.float64), 1e-3, 1 - 1e-3
        )
        with torch.no_grad():
            self.head.bias.copy_(torch.from_numpy(np.log(p / (1 - p))).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.forward_features(x))


def freeze_stages(encoder: nn.Module, k: int) -> int:
    """Freeze the patch embedding and blocks of the first ``k`` DaViT stages; returns the frozen tensor count.

    Stage ``i`` owns ``convs.i.*`` and ``blocks.i.*`` (the official key layout), so this works for any
    depth config. Early stages hold generic edge/texture filters and most of the activation memory.
    """
    if k <= 0:
        return 0
    n_stages = len(encoder.convs)
    if k > n_stages:
        raise ConfigError(f"--freeze-stages {k} exceeds the image tower's {n_stages} stages.")
    frozen = 0
    pattern = re.compile(r"^(convs|blocks)\.(\d+)\.")
    for name, p in encoder.named_parameters():
        m = pattern.match(name)
        if m and int(m.group(2)) < k:
            p.requires_grad_(False)
            frozen += 1
    return frozen
