"""The epoch loop: optimizer steps with accumulation, SIGTERM-safe stops, validation and best weights."""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cxr_embed.atomicio import atomic_path
from cxr_embed.finetune.checkpoint import _cpu_state, save_checkpoint
from cxr_embed.finetune.config import BEST_DIR, StepInfo, TrainState
from cxr_embed.finetune.data import decode_loader, epoch_batches, mean_auc
from cxr_embed.finetune.optim import augment_batch, lr_at, step_generator
from cxr_embed.finetune.run import _eval_weights, _predict, _Run
from cxr_embed.precision import autocast

# --------------------------------------------------------------------------------------- signals


class StopFlag:
    """Set by SIGTERM (pre-emption, ``kill``): the loop saves at the next step boundary and returns."""

    def __init__(self) -> None:
        self.requested = False

    @contextmanager
    def installed(self) -> Iterator[StopFlag]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum: int, frame: Any) -> None:
            self.requested = True

        previous = signal.signal(signal.SIGTERM, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)


def _train(
    run: _Run, state: TrainState, *, progress: bool, on_step: Callable[[StepInfo], None] | None
) -> str:
    """The epoch loop; returns "completed", "early_stopped", "max_steps" or "interrupted"."""
    from cxr_embed.progress import progress_bar

    cfg, train_idx = run.config, run.splits["train"]
    mean, std = run.base.preprocessor.mean, run.base.preprocessor.std
    n_t = len(run.names)
    # The bar counts optimizer steps, the unit of the summary ("N steps") and of --max-steps.
    last_step = run.total_steps if cfg.max_steps is None else min(run.total_steps, cfg.max_steps)
    remaining_steps = max(0, last_step - state.global_step)
    started = time.perf_counter()
    with StopFlag().installed() as stop, progress_bar(remaining_steps, "fine-tune steps", enabled=progress) as bar:
        while state.epoch < cfg.epochs and not state.done:
            steps = epoch_batches(len(train_idx), state.epoch, cfg.seed, cfg.batch_size)[
                state.step_in_epoch :
            ]
            plan = [
                [c.tolist() for c in np.array_split(train_idx[b], cfg.accumulate) if len(c)] for b in steps
            ]
            loader = iter(
                decode_loader(
                    run.records,
                    run.base.preprocessor,
                    [m for step in plan for m in step],
                    workers=cfg.workers,
                    seed=cfg.seed * 7919 + state.epoch * 131 + state.step_in_epoch,
                    device=run.device,
                )
            )
            for micro_batches, b in zip(plan, steps, strict=True):
                if cfg.max_steps is not None and state.global_step >= cfg.max_steps:
                    _checkpoint(run, state)
                    run.timings["train_s"] = time.perf_counter() - started
                    return "max_steps"
                t0 = time.perf_counter()
                lr = lr_at(state.global_step, run.total_steps, run.warmup, cfg.lr, cfg.min_lr)
                loss = _train_step(
                    run, loader, len(micro_batches), len(b) * n_t, lr, state.global_step, mean, std
                )
                state.global_step += 1
                state.step_in_epoch += 1
                if loss is not None:
                    state.epoch_losses.append(loss)
                rate = len(b) / max(time.perf_counter() - t0, 1e-9)
                bar.advance(1)
                bar.note(
                    f"ep {state.epoch + 1}/{cfg.epochs} loss {loss if loss is not None else float('nan'):.3f}"
                )
                if on_step is not None:
                    on_step(
                        StepInfo(
                            state.epoch,
                            state.step_in_epoch,
                            state.global_step,
                            float("nan") if loss is None else loss,
                            lr,
                            rate,
                        )
                    )
                if stop.requested:
                    _checkpoint(run, state)
                    return "interrupted"
            _end_epoch(run, state)
            if state.epochs_since_best >= cfg.patience:
                state.done = True
            _checkpoint(run, state)
    run.timings["train_s"] = time.perf_counter() - started
    return "early_stopped" if state.epoch < cfg.epochs else "completed"


def _checkpoint(run: _Run, state: TrainState) -> None:
    """Everything an exact resume needs, at a step boundary (end of epoch, --max-steps or SIGTERM)."""
    save_checkpoint(run.out, net=run.net, optimizer=run.optimizer, scaler=run.scaler, ema=run.ema, state=state)


def _train_step(
    run: _Run,
    loader: Iterator,
    n_micro: int,
    n_terms: int,
    lr: float,
    global_step: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> float | None:
    """One optimizer step over ``n_micro`` micro-batches; the loss is the mean BCE over the whole step."""
    cfg = run.config
    for g in run.optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"]
    run.optimizer.zero_grad(set_to_none=True)
    total, trained = 0.0, False
    for m in range(n_micro):
        batch = next(loader)
        run.record_failures(batch.failures)
        if batch.pixels is None:
            continue
        # uint8 through the loader (and over PCIe); normalised where the model runs, then augmented
        x = run.base.preprocessor.normalize(batch.pixels.to(run.device, non_blocking=True))
        y = torch.from_numpy(run.targets[batch.indices]).to(run.device)
        if cfg.augment:
            x = augment_batch(x, step_generator(cfg.seed, global_step, m), mean, std, hflip=cfg.hflip)
        with autocast(run.device.type, cfg.precision):
            logits = run.net(x)
        loss = (
            F.binary_cross_entropy_with_logits(logits.float(), y, pos_weight=run.pos_weight, reduction="sum")
            / n_terms
        )
        run.scaler.scale(loss).backward()
        total += float(loss.detach())
        trained = True
    if not trained:
        return None
    run.scaler.unscale_(run.optimizer)
    torch.nn.utils.clip_grad_norm_([p for _, p in run.trainable()], cfg.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.ema is not None:
        run.ema.update(run.trainable())
    return total


def _end_epoch(run: _Run, state: TrainState) -> None:
    """Validate, keep the best weights (by mean validation ROC-AUC), advance the epoch counter."""
    from safetensors.torch import save_file

    with _eval_weights(run):
        idx, logits = _predict(run, "val")
        auc = mean_auc(run.targets[idx], logits)
        improved = state.best_auc is None or (not math.isnan(auc) and auc > state.best_auc)
        if improved:
            best = run.out / BEST_DIR
            best.mkdir(exist_ok=True)
            with atomic_path(best / "model.safetensors") as tmp:
                save_file(_cpu_state(run.net), tmp)
    losses = state.epoch_losses
    state.history.append(
        {
            "epoch": state.epoch + 1,
            "train_loss": float(np.mean(losses)) if losses else None,
            "val_roc_auc": None if math.isnan(auc) else auc,
            "global_step": state.global_step,
        }
    )
    if improved:
        state.best_auc = (
            None if math.isnan(auc) else auc
        )  # None = no usable AUC yet; the next epoch may replace it
        state.best_epoch, state.epochs_since_best = state.epoch + 1, 0
    else:
        state.epochs_since_best += 1
    state.epoch += 1
    state.step_in_epoch = 0
    state.epoch_losses = []
