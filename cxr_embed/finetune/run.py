"""The state one fine-tuning run shares between its training loop and its final evaluation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr_embed.finetune.checkpoint import _cpu_state
from cxr_embed.finetune.config import BEST_DIR, FineTuneConfig
from cxr_embed.finetune.data import ImageDataset, predict_logits
from cxr_embed.finetune.optim import EMA, FineTuneNet


@dataclass
class _Run:
    """Everything the training loop and the final evaluation share."""

    config: FineTuneConfig
    out: Path
    run_id: str
    created_at: str
    base: Any  # the loaded MedImageInsight (its module holds the full UniCL)
    net: FineTuneNet
    optimizer: torch.optim.Optimizer
    scaler: Any
    ema: EMA | None
    device: torch.device
    dataset: ImageDataset
    targets: np.ndarray
    splits: dict[str, np.ndarray]
    names: list[str]
    pos_weight: torch.Tensor | None
    total_steps: int
    warmup: int
    failures: dict[str, dict[str, str]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def record_failures(self, bad: list[tuple[int, str]]) -> None:
        for i, reason in bad:
            r = self.dataset.records[i]
            self.failures.setdefault(
                r.image_id, {"image_id": r.image_id, "path": r.path, "stage": "decode", "reason": reason}
            )

    def trainable(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, p) for n, p in self.net.named_parameters() if p.requires_grad]


def _sizes(run: _Run) -> dict[str, int]:
    return {k: int(len(v)) for k, v in run.splits.items()}


@contextmanager
def _eval_weights(run: _Run) -> Iterator[None]:
    """Evaluate (and export) the EMA weights when EMA is on, else the live weights."""
    if run.ema is None:
        yield
    else:
        with run.ema.applied(run.net):
            yield


def _predict(run: _Run, split: str) -> tuple[np.ndarray, np.ndarray]:
    idx, logits, bad = predict_logits(
        run.net,
        run.dataset,
        run.splits[split],
        batch_size=run.config.micro_batch,
        device=run.device,
        precision=run.config.precision,
        workers=run.config.workers,
        seed=run.config.seed,
    )
    run.record_failures(bad)
    return idx, logits


def _load_best(run: _Run) -> None:
    from safetensors.torch import load_file, save_file

    path = run.out / BEST_DIR / "model.safetensors"
    if not path.is_file():  # stopped by --max-steps before any validation: evaluate the current weights
        with _eval_weights(run):
            path.parent.mkdir(exist_ok=True)
            save_file(_cpu_state(run.net), path)
    run.net.load_state_dict(load_file(path, device=str(run.device)), strict=True)
