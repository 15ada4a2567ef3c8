"""End-to-end fine-tuning of the MedImageInsight image tower with a linear classification head.

The study this project reproduces got its best result (ROC-AUC 0.888) by fine-tuning the image tower
with AdamW (lr 1e-5, weight decay 0.2, batch 48). This module does that as one resumable job and
evaluates it exactly like the frozen-embedding classifiers (same metric code, same result tables,
``arm = "finetuned"``), so one SQL query compares the two arms.

Design choices, and why:

* **Splits are patient-wise.** ChestX-ray14's official lists are used when the records carry them;
  validation is carved from train *by patient*; without official lists a test slice is carved the
  same way. The split is written to ``splits.json`` and reused on ``--resume``.
* **Exact resume.** Everything that decides the next update is checkpointed: weights, AdamW moments
  (flattened into safetensors, no pickle), the GradScaler, the EMA shadow, the RNG states of torch /
  numpy / python (DropPath draws from torch's), and the position in the data. The data order is a
  permutation seeded by ``(seed, epoch)``, augmentation draws from a generator seeded by the global
  step, and the DataLoader gets its own generator, so nothing depends on *when* a process started.
  The learning-rate schedule is a pure function of the step; ``--max-steps`` only stops early and
  never changes the schedule, so "stop at N, resume" equals "run straight through".
* **SIGTERM** (pre-emption) sets a flag; the current optimizer step finishes, a checkpoint is saved
  and :func:`finetune` returns with ``status="interrupted"``.
* **Export** writes the official model-folder layout with the *full* original key set (fine-tuned
  ``image_encoder.*``, untouched text tower, projections and ``logit_scale``), so the strict loader
  and ``cxr-embed index --model-dir`` use it like the base model. ``NAME`` in ``config.yaml`` gets a
  ``finetuned`` suffix so the ``model_id`` differs and a store never mixes base and fine-tuned rows.
  The head and its temperature live next to it in ``head.safetensors`` + ``head.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import expit
from torch import nn

from cxr_embed.atomicio import atomic_path, replace_dir, write_json_atomic, write_parquet_atomic
from cxr_embed.errors import CheckpointError, ConfigError, EvaluationError, InputError
from cxr_embed.precision import PRECISIONS, autocast
from cxr_embed.records import FINDINGS, ImageRecord

#: Options that may change when a run is resumed; everything else must match the interrupted run.
RUNTIME_FIELDS = frozenset({"max_steps", "workers", "device", "store", "source", "dataset"})
#: Exit status the CLI uses for a run stopped by SIGTERM with a checkpoint saved (EX_TEMPFAIL: "retry").
EXIT_INTERRUPTED = 75
ARM = "finetuned"
CLASSIFIER = "finetune"
CHECKPOINT_DIR = "checkpoint"
BEST_DIR = "best"
MODEL_DIR = "model"
#: Parameter-name patterns without weight decay: the reference's NO_WEIGHT_DECAY_MODULES (dw, norm) and
#: WEIGHT_DECAY_PATTERNS (biases, logit_scale, positional/token embeddings).
NO_DECAY_PATTERNS = (r"(^|\.)dw\.", r"(^|\.)norms?\.", r"(^|\.)norm\d*\.", r"\.bias$", r"^bias$", r"logit_scale",
                     r"positional_embedding", r"token_embedding", r"(^|\.)ln_")


@dataclass
class FineTuneConfig:
    """Every setting of a fine-tuning run (saved as ``config.json`` in the output folder)."""

    source: str
    out: str
    dataset: str = "auto"
    model_dir: str | None = None
    epochs: int = 10
    lr: float = 1e-5
    head_lr_scale: float = 1.0     # the head's learning rate is lr x this (1 = the study's single learning rate)
    min_lr: float = 0.0
    weight_decay: float = 0.2
    batch_size: int = 48            # images per optimizer step (the study's 48), split into `accumulate` micro-batches
    accumulate: int = 1
    warmup_fraction: float = 0.05   # linear warm-up over this share of all optimizer steps (at least 1 step)
    precision: str = "fp32"         # fp32 | bf16 | fp16 (autocast; fp16 adds a GradScaler)
    grad_checkpointing: bool = False
    freeze_stages: int = 0
    label: str = "abnormal"         # abnormal | all-findings
    class_weighting: bool = False
    ema: float | None = None        # EMA decay of the weights (e.g. 0.999); evaluation and export use the EMA
    augment: bool = True
    hflip: bool = False
    patience: int = 3               # epochs without a better validation ROC-AUC before stopping
    max_steps: int | None = None    # stop after this many optimizer steps in total (schedule unchanged)
    val_fraction: float = 0.1
    test_fraction: float = 0.2      # only used when the records carry no official split
    clip_grad: float = 1.0
    workers: int = 0
    device: str = "auto"
    store: str | None = None
    seed: int = 0
    reader_options: dict[str, Any] = field(default_factory=dict)  # the reader's options (--labels, --key-file, …)
    n_boot: int = 1000

    def validate(self) -> None:
        """Refuse impossible option combinations before anything is loaded."""
        problems = []
        if self.precision not in PRECISIONS:
            problems.append(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.label not in ("abnormal", "all-findings"):
            problems.append(f"--label must be 'abnormal' or 'all-findings', not {self.label!r}")
        if self.batch_size < 1 or self.accumulate < 1 or self.batch_size % self.accumulate:
            problems.append(f"--batch-size ({self.batch_size}) must be a positive multiple of --accumulate "
                            f"({self.accumulate}): each step is split into equal micro-batches")
        if self.epochs < 1:
            problems.append("--epochs must be at least 1")
        if self.lr <= 0 or self.head_lr_scale <= 0 or self.weight_decay < 0:
            problems.append("--lr and --head-lr-scale must be > 0 and --weight-decay >= 0")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            problems.append(f"--ema is a decay in (0, 1), e.g. 0.999, not {self.ema}")
        if self.freeze_stages < 0:
            problems.append("--freeze-stages must be >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append("--max-steps must be at least 1")
        if not 0.0 < self.val_fraction < 0.5 or not 0.0 < self.test_fraction < 0.5:
            problems.append("validation and test fractions must lie in (0, 0.5)")
        if problems:
            raise ConfigError("Invalid fine-tuning options: " + "; ".join(problems) + ".")

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.accumulate


@dataclass
class TrainState:
    """Scalars that locate the run in time; saved as JSON in every checkpoint."""

    epoch: int = 0                 # current epoch (0-based); equals `epochs` when training is complete
    step_in_epoch: int = 0         # optimizer steps already done in `epoch`
    global_step: int = 0
    best_auc: float | None = None
    best_epoch: int | None = None
    epochs_since_best: int = 0
    done: bool = False
    epoch_losses: list[float] = field(default_factory=list)   # this epoch's step losses so far (survive a resume)
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class StepInfo:
    """What the ``on_step`` callback sees after every optimizer step."""

    epoch: int
    step: int
    global_step: int
    loss: float
    lr: float
    images_per_s: float


@dataclass
class FineTuneResult:
    """Outcome of :func:`finetune`."""

    status: str                    # "completed" | "early_stopped" | "max_steps" | "interrupted"
    run_id: str
    out: Path
    state: TrainState
    model_dir: Path | None = None
    temperature: float | None = None
    test_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    n_images: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------------------- optimisation


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """True for norms, biases, depthwise convs, ``logit_scale`` and embeddings (the reference's rules).

    Any 1-D or scalar parameter is also exempt: those are gains and offsets whatever their name.
    """
    return param.ndim <= 1 or any(re.search(p, name) for p in NO_DECAY_PATTERNS)


def param_groups(named: Sequence[tuple[str, torch.Tensor]], weight_decay: float,
                 head_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """AdamW parameter groups: ``[decay, no_decay]`` over the trainable tower parameters, names kept for checks,
    then the same two for the classification head (``head.*``) when there is one.

    Each group carries ``lr_scale`` (the head's is ``head_lr_scale``): a freshly initialised head
    learns slowly at the tower's small learning rate, so users may give it a larger one.
    """
    buckets: dict[tuple[bool, bool], list[tuple[str, torch.Tensor]]] = {
        (h, d): [] for h in (False, True) for d in (True, False)}
    for name, p in named:
        if p.requires_grad:
            buckets[(name.startswith("head."), not no_weight_decay(name, p))].append((name, p))
    return [
        {"params": [p for _, p in items], "names": [n for n, _ in items],
         "weight_decay": weight_decay if decay else 0.0, "lr_scale": head_lr_scale if head else 1.0}
        for (head, decay), items in buckets.items() if not head or items
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


def augment_batch(x: torch.Tensor, generator: torch.Generator, mean: Sequence[float], std: Sequence[float], *,
                  max_rotation_deg: float = 7.0, scale: tuple[float, float] = (0.9, 1.1),
                  brightness: float = 0.1, contrast: float = 0.1, hflip: bool = False) -> torch.Tensor:
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
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros_like(cos)], 1),
                         torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1)
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
        p = np.clip(np.asarray(prior if prior is not None else [0.5] * n_targets, dtype=np.float64), 1e-3, 1 - 1e-3)
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


# --------------------------------------------------------------------------------------- checkpoints


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer ``state_dict`` → (tensors for safetensors, JSON for the rest); no pickle anywhere."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    np_state = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np.asarray(np_state[1]).astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    py = random.getstate()
    meta = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py[0], list(py[1]), py[2]]}
    return tensors, meta


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(out: Path, *, net: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any,
                    ema: EMA | None, state: TrainState) -> Path:
    """Write ``out/checkpoint`` atomically: build ``checkpoint.tmp``, then swap directories.

    A crash at any moment leaves either the old or the new complete checkpoint (``checkpoint.old`` is
    picked up by :func:`load_checkpoint` if the crash fell between the two renames).
    """
    from safetensors.torch import save_file

    def build(tmp: Path) -> None:
        save_file(_cpu_state(net), tmp / "model.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        if ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.shadow.items()}, tmp / "ema.safetensors")
        rng_tensors, rng_meta = _rng_state()
        save_file(rng_tensors, tmp / "rng.safetensors")
        write_json_atomic({"train": dataclasses.asdict(state), "optimizer": opt_meta, "rng": rng_meta,
                           "scaler": scaler.state_dict() if scaler.is_enabled() else None}, tmp / "state.json")

    return replace_dir(out / CHECKPOINT_DIR, build)


def load_checkpoint(out: Path, *, net: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any,
                    ema: EMA | None) -> TrainState:
    """Restore everything :func:`save_checkpoint` wrote; returns the train state."""
    from safetensors.torch import load_file

    ckpt = out / CHECKPOINT_DIR
    if not (ckpt / "state.json").is_file() and (out / f"{CHECKPOINT_DIR}.old" / "state.json").is_file():
        ckpt = out / f"{CHECKPOINT_DIR}.old"
    if not (ckpt / "state.json").is_file():
        raise CheckpointError(f"No checkpoint in {out}: nothing to resume. Start a run without --resume.")
    try:
        meta = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
        device = next(net.parameters()).device
        net.load_state_dict(load_file(ckpt / "model.safetensors", device=str(device)), strict=True)
        optimizer.load_state_dict(_unflatten_optimizer(load_file(ckpt / "optimizer.safetensors"), meta["optimizer"]))
        if ema is not None:
            shadow = load_file(ckpt / "ema.safetensors", device=str(device))
            if set(shadow) != set(ema.shadow):
                raise CheckpointError(f"{ckpt}: the EMA weights do not match the trainable parameters.")
            ema.shadow = shadow
        if meta["scaler"] is not None and scaler.is_enabled():
            scaler.load_state_dict(meta["scaler"])
        _set_rng_state(load_file(ckpt / "rng.safetensors"), meta["rng"])
        return TrainState(**meta["train"])
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"Checkpoint {ckpt} is unreadable or does not match this model ({exc}). "
                              f"Start a fresh run with another --out.") from None


# --------------------------------------------------------------------------------------- config persistence


def save_run_config(config: FineTuneConfig) -> None:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(dataclasses.asdict(config), out / "config.json")


def load_run_config(out: str | Path) -> FineTuneConfig:
    """The configuration of the run in ``out`` (for ``--resume``)."""
    path = Path(out) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{out} holds no fine-tuning run (no config.json); start one without --resume.")
    fields = {f.name for f in dataclasses.fields(FineTuneConfig)}
    return FineTuneConfig(**{k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items() if k in fields})


def resume_config(out: str | Path, overrides: dict[str, Any]) -> FineTuneConfig:
    """The saved config with ``overrides`` applied; only :data:`RUNTIME_FIELDS` may differ.

    Changing a training setting mid-run would make the resumed run a different experiment whose
    numbers nobody could reproduce, so it is refused with the values side by side.
    """
    saved = load_run_config(out)
    clashes = [f"{k} (run: {getattr(saved, k)!r}, given: {v!r})" for k, v in overrides.items()
               if k not in RUNTIME_FIELDS and k != "out" and getattr(saved, k) != v]
    if clashes:
        raise ConfigError("--resume continues the run in " + str(out) + " with its own settings; these differ: "
                          + "; ".join(clashes) + ". Drop them, or start a new run with another --out.")
    return dataclasses.replace(saved, **{k: v for k, v in overrides.items() if k in RUNTIME_FIELDS})


# --------------------------------------------------------------------------------------- data


def target_names(label: str) -> list[str]:
    return ["abnormal"] if label == "abnormal" else list(FINDINGS)


def targets_of(records: Sequence[ImageRecord], label: str) -> np.ndarray:
    """(N, T) float32 targets; rows without the needed label are NaN (dropped by the caller)."""
    if label == "abnormal":
        return np.array([[np.nan if r.label is None else r.label] for r in records], dtype=np.float32)
    n = len(target_names(label))
    return np.array([r.findings if r.findings is not None else (np.nan,) * n for r in records], dtype=np.float32)


def _carve(indices: np.ndarray, groups: np.ndarray, positive: np.ndarray, fraction: float,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Move ``fraction`` of the patients (stratified by whether a patient has any positive) out of ``indices``."""
    taken: list[str] = []
    pats = groups[indices]
    pos_pats = set(pats[positive[indices]])
    for stratum in (sorted(pos_pats), sorted(set(pats) - pos_pats)):
        order = rng.permutation(len(stratum))
        n_take = int(round(len(stratum) * fraction))
        if len(stratum) >= 2:
            n_take = max(1, n_take)
        taken.extend(stratum[i] for i in order[:n_take])
    mask = np.isin(pats, np.array(taken, dtype=object))
    return indices[~mask], indices[mask]


def patient_splits(records: Sequence[ImageRecord], targets: np.ndarray, *, val_fraction: float,
                   test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Patient-wise train/val/test indices into ``records``.

    The official test list is used when any record has ``split`` set (records without one join
    train); otherwise a test slice is carved by patient. Validation is always carved from train by
    patient, stratified on "patient has any positive" so both classes reach it.
    """
    rng = np.random.default_rng(seed)
    groups = np.array([r.patient_id or f"image:{r.image_id}" for r in records], dtype=object)
    positive = np.nansum(targets, axis=1) > 0
    all_idx = np.arange(len(records))
    if any(r.split is not None for r in records):
        is_test = np.array([r.split == "test" for r in records])
        train, test = all_idx[~is_test], all_idx[is_test]
    else:
        train, test = _carve(all_idx, groups, positive, test_fraction, rng)
    train, val = _carve(train, groups, positive, val_fraction, rng)
    shared = (set(groups[train]) & set(groups[val])) | (set(groups[train]) & set(groups[test])) \
        | (set(groups[val]) & set(groups[test]))
    if shared:
        raise EvaluationError(f"{len(shared)} patients appear in more than one of train/validation/test "
                              f"(e.g. {sorted(shared)[:3]}); the official split lists disagree with the patient ids.")
    for name, idx in (("train", train), ("validation", val), ("test", test)):
        if len(idx) == 0:
            raise EvaluationError(f"The {name} split is empty ({len(records)} labelled images, "
                                  f"{len(set(groups))} patients); fine-tuning needs more patients.")
    return {"train": train, "val": val, "test": test}


def epoch_batches(n: int, epoch: int, seed: int, batch_size: int) -> list[np.ndarray]:
    """The optimizer steps of one epoch: a permutation seeded by ``(seed, epoch)`` cut into batches."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


class ImageDataset:
    """Decode + preprocess one record; failures come back as a reason instead of raising."""

    def __init__(self, records: Sequence[ImageRecord], targets: np.ndarray, preprocessor: Any):
        self.records, self.targets, self.preprocessor = list(records), targets, preprocessor

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, Any, str | None]:
        from cxr_embed.imageio import read_image

        try:
            return i, self.preprocessor(read_image(self.records[i].path)), None
        except (InputError, OSError, ValueError) as exc:
            return i, None, str(exc) or type(exc).__name__


def collate(items: list[tuple[int, Any, str | None]]) -> tuple[list[int], Any, list[tuple[int, str]]]:
    """Stack the decoded images; keep (index, reason) of the ones that failed."""
    ok = [(i, t) for i, t, _ in items if t is not None]
    failed = [(i, reason) for i, t, reason in items if t is None]
    batch = torch.stack([t for _, t in ok]) if ok else None
    return [i for i, _ in ok], batch, failed


def _loader(dataset: ImageDataset, batches: list[list[int]], workers: int, seed: int, pin: bool) -> Any:
    from torch.utils.data import DataLoader

    # Own generator: the DataLoader would otherwise draw its worker seed from torch's global RNG, which
    # DropPath also uses, and a resumed run would see a different DropPath stream.
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                      pin_memory=pin, generator=torch.Generator().manual_seed(seed))


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


# --------------------------------------------------------------------------------------- evaluation helpers


@torch.no_grad()
def predict_logits(net: nn.Module, dataset: ImageDataset, indices: np.ndarray, *, batch_size: int, device: torch.device,
                   precision: str, workers: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Eval-mode logits for ``dataset[indices]``: (indices that decoded, (n, T) float64 logits, failures)."""
    was_training = net.training
    net.eval()
    batches = [indices[i:i + batch_size].tolist() for i in range(0, len(indices), batch_size)]
    kept: list[int] = []
    outs: list[np.ndarray] = []
    failed: list[tuple[int, str]] = []
    try:
        for idx, x, bad in _loader(dataset, batches, workers, seed, device.type == "cuda"):
            failed.extend(bad)
            if x is None:
                continue
            with autocast(device.type, precision):
                logits = net(x.to(device, non_blocking=True))
            kept.extend(idx)
            outs.append(logits.float().cpu().numpy().astype(np.float64))
    finally:
        net.train(was_training)
    n_t = net.head.out_features
    return np.asarray(kept, dtype=np.int64), (np.concatenate(outs) if outs else np.zeros((0, n_t))), failed


def mean_auc(y: np.ndarray, scores: np.ndarray) -> float:
    """Mean ROC-AUC over the targets that have both classes (NaN when none has)."""
    from cxr_embed.metrics import roc_auc

    aucs = [roc_auc(y[:, t], scores[:, t]) for t in range(y.shape[1])]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


# --------------------------------------------------------------------------------------- the job


@dataclass
class _Run:
    """Everything the training loop and the final evaluation share."""

    config: FineTuneConfig
    out: Path
    run_id: str
    created_at: str
    base: Any                      # the loaded MedImageInsight (its module holds the full UniCL)
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
            self.failures.setdefault(r.image_id, {"image_id": r.image_id, "path": r.path, "stage": "decode",
                                                  "reason": reason})

    def trainable(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, p) for n, p in self.net.named_parameters() if p.requires_grad]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _labelled(records: list[ImageRecord], label: str) -> tuple[list[ImageRecord], np.ndarray]:
    targets = targets_of(records, label)
    keep = ~np.isnan(targets).any(axis=1)
    if not keep.any():
        what = "a Normal/Abnormal label" if label == "abnormal" else "the 14 finding flags"
        raise InputError(f"None of the {len(records)} images has {what}; fine-tuning needs labelled images "
                         f"(ChestX-ray14 Data_Entry CSV, or a folder with a label CSV / class sub-folders).")
    return [r for r, k in zip(records, keep, strict=True) if k], targets[keep]


def _splits_for(out: Path, records: list[ImageRecord], targets: np.ndarray, config: FineTuneConfig,
                resume: bool) -> dict[str, np.ndarray]:
    """The split of a resumed run is read back by image_id, so it survives a re-listed source folder."""
    path = out / "splits.json"
    pos = {r.image_id: i for i, r in enumerate(records)}
    if resume and path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        missing = [i for ids in saved.values() for i in ids if i not in pos]
        if missing:
            raise InputError(f"{len(missing)} images of the interrupted run are gone from {config.source} "
                             f"(e.g. {missing[:3]}); resume needs the same images.", config.source)
        return {k: np.array([pos[i] for i in ids], dtype=np.int64) for k, ids in saved.items()}
    splits = patient_splits(records, targets, val_fraction=config.val_fraction,
                            test_fraction=config.test_fraction, seed=config.seed)
    write_json_atomic({k: [records[i].image_id for i in v] for k, v in splits.items()}, path)
    return splits


def _pos_weight(y: np.ndarray, device: torch.device) -> torch.Tensor:
    """n_negative / n_positive per target on the training split (rare findings weigh more)."""
    pos = y.sum(axis=0)
    w = np.where(pos > 0, (len(y) - pos) / np.maximum(pos, 1), 1.0).clip(1e-3, 1e3)
    return torch.tensor(w, dtype=torch.float32, device=device)


def _run_identity(out: Path, resume: bool) -> tuple[str, str]:
    path = out / "run.json"
    if resume and path.is_file():
        meta = json.loads(path.read_text(encoding="utf-8"))
        return meta["run_id"], meta["created_at"]
    from cxr_embed.evaluation import new_run_id

    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    run_id = new_run_id("finetune")
    write_json_atomic({"run_id": run_id, "created_at": now}, path)
    return run_id, now


def _setup(config: FineTuneConfig, resume: bool) -> _Run:
    from cxr_embed.model import MedImageInsight
    from cxr_embed.readers import read_dataset

    out = Path(config.out)
    started = time.perf_counter()
    read_failures: list[Any] = []
    listed = read_dataset(config.source, config.dataset, errors=read_failures, **config.reader_options)
    records, targets = _labelled(listed, config.label)
    splits = _splits_for(out, records, targets, config, resume)
    run_id, created_at = _run_identity(out, resume)
    base = MedImageInsight.load(config.model_dir, device=config.device, precision="fp32")
    device = base.device
    if config.precision == "fp16" and device.type != "cuda":
        raise ConfigError("fp16 training needs a CUDA GPU (it relies on a GradScaler); use bf16 or fp32 on CPU.")
    _seed_everything(config.seed)   # after the model build, so the head init and DropPath stream depend on the seed only
    encoder = base.module.image_encoder
    encoder.set_grad_checkpointing(config.grad_checkpointing)
    freeze_stages(encoder, config.freeze_stages)
    prior = targets[splits["train"]].mean(axis=0)
    net = FineTuneNet(encoder, encoder.num_features, len(target_names(config.label)), prior).to(device)
    net.train()
    groups = param_groups(list(net.named_parameters()), config.weight_decay, config.head_lr_scale)
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=(0.9, 0.999), eps=1e-8)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    named = list(net.named_parameters())
    ema = EMA(named, config.ema) if config.ema is not None else None
    steps_per_epoch = math.ceil(len(splits["train"]) / config.batch_size)
    total = steps_per_epoch * config.epochs
    run = _Run(config=config, out=out, run_id=run_id, created_at=created_at, base=base, net=net,
               optimizer=optimizer, scaler=scaler, ema=ema, device=device,
               dataset=ImageDataset(records, targets, base.preprocessor), targets=targets, splits=splits,
               names=target_names(config.label),
               pos_weight=_pos_weight(targets[splits["train"]], device) if config.class_weighting else None,
               total_steps=total, warmup=warmup_steps(total, config.warmup_fraction))
    for f in read_failures:
        run.failures.setdefault(f.image_id, {"image_id": f.image_id, "path": f.path, "stage": f.stage,
                                             "reason": f.reason})
    run.timings["setup_s"] = time.perf_counter() - started
    return run


def finetune(config: FineTuneConfig, *, resume: bool = False, progress: bool = True,
             on_step: Callable[[StepInfo], None] | None = None) -> FineTuneResult:
    """Fine-tune, evaluate and export; see the module docstring. Safe to call again with ``resume=True``.

    ``on_step`` is called after every optimizer step (logging, notebooks, tests).
    """
    config.validate()
    out = Path(config.out)
    if not resume and ((out / "config.json").exists() or (out / CHECKPOINT_DIR).exists()):
        raise ConfigError(f"{out} already holds a fine-tuning run. Pass --resume to continue it, "
                          f"or choose another --out.")
    if resume and not (out / "config.json").is_file():
        raise CheckpointError(f"{out} holds no fine-tuning run to resume; start one without --resume.")
    out.mkdir(parents=True, exist_ok=True)
    save_run_config(config)
    run = _setup(config, resume)
    state = TrainState()
    if resume and ((out / CHECKPOINT_DIR).exists() or (out / f"{CHECKPOINT_DIR}.old").exists()):
        state = load_checkpoint(out, net=run.net, optimizer=run.optimizer, scaler=run.scaler, ema=run.ema)
    status = _train(run, state, progress=progress, on_step=on_step)
    if status == "interrupted":
        return FineTuneResult(status=status, run_id=run.run_id, out=out, state=state,
                              failures=list(run.failures.values()), n_images=_sizes(run))
    return _finish(run, state, status)


def _sizes(run: _Run) -> dict[str, int]:
    return {k: int(len(v)) for k, v in run.splits.items()}


def _train(run: _Run, state: TrainState, *, progress: bool, on_step: Callable[[StepInfo], None] | None) -> str:
    """The epoch loop; returns "completed", "early_stopped", "max_steps" or "interrupted"."""
    from cxr_embed.progress import progress_bar

    cfg, train_idx = run.config, run.splits["train"]
    mean, std = run.base.preprocessor.mean, run.base.preprocessor.std
    n_t = len(run.names)
    remaining_images = max(0, (cfg.epochs - state.epoch) * len(train_idx) - state.step_in_epoch * cfg.batch_size)
    started = time.perf_counter()
    with StopFlag().installed() as stop, progress_bar(remaining_images, "fine-tune", enabled=progress) as bar:
        while state.epoch < cfg.epochs and not state.done:
            steps = epoch_batches(len(train_idx), state.epoch, cfg.seed, cfg.batch_size)[state.step_in_epoch:]
            plan = [[c.tolist() for c in np.array_split(train_idx[b], cfg.accumulate) if len(c)] for b in steps]
            loader = iter(_loader(run.dataset, [m for step in plan for m in step], cfg.workers,
                                  cfg.seed * 7919 + state.epoch * 131 + state.step_in_epoch,
                                  run.device.type == "cuda"))
            for micro_batches, b in zip(plan, steps, strict=True):
                if cfg.max_steps is not None and state.global_step >= cfg.max_steps:
                    save_checkpoint(run.out, net=run.net, optimizer=run.optimizer, scaler=run.scaler,
                                    ema=run.ema, state=state)
                    run.timings["train_s"] = time.perf_counter() - started
                    return "max_steps"
                t0 = time.perf_counter()
                lr = lr_at(state.global_step, run.total_steps, run.warmup, cfg.lr, cfg.min_lr)
                loss = _train_step(run, loader, len(micro_batches), len(b) * n_t, lr, state.global_step, mean, std)
                state.global_step += 1
                state.step_in_epoch += 1
                if loss is not None:
                    state.epoch_losses.append(loss)
                rate = len(b) / max(time.perf_counter() - t0, 1e-9)
                bar.advance(len(b))
                bar.note(f"epoch {state.epoch + 1}/{cfg.epochs} loss {loss if loss is not None else float('nan'):.4f}"
                         f" lr {lr:.2e}")
                if on_step is not None:
                    on_step(StepInfo(state.epoch, state.step_in_epoch, state.global_step,
                                     float("nan") if loss is None else loss, lr, rate))
                if stop.requested:
                    save_checkpoint(run.out, net=run.net, optimizer=run.optimizer, scaler=run.scaler,
                                    ema=run.ema, state=state)
                    return "interrupted"
            _end_epoch(run, state)
            if state.epochs_since_best >= cfg.patience:
                state.done = True
            save_checkpoint(run.out, net=run.net, optimizer=run.optimizer, scaler=run.scaler, ema=run.ema,
                            state=state)
    run.timings["train_s"] = time.perf_counter() - started
    return "early_stopped" if state.epoch < cfg.epochs else "completed"


def _train_step(run: _Run, loader: Iterator, n_micro: int, n_terms: int, lr: float, global_step: int,
                mean: Sequence[float], std: Sequence[float]) -> float | None:
    """One optimizer step over ``n_micro`` micro-batches; the loss is the mean BCE over the whole step."""
    cfg = run.config
    for g in run.optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"]
    run.optimizer.zero_grad(set_to_none=True)
    total, trained = 0.0, False
    for m in range(n_micro):
        idx, x, bad = next(loader)
        run.record_failures(bad)
        if x is None:
            continue
        x = x.to(run.device, non_blocking=True)
        y = torch.from_numpy(run.targets[idx]).to(run.device)
        if cfg.augment:
            x = augment_batch(x, step_generator(cfg.seed, global_step, m), mean, std, hflip=cfg.hflip)
        with autocast(run.device.type, cfg.precision):
            logits = run.net(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y, pos_weight=run.pos_weight,
                                                  reduction="sum") / n_terms
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


@contextmanager
def _eval_weights(run: _Run) -> Iterator[None]:
    """Evaluate (and export) the EMA weights when EMA is on, else the live weights."""
    if run.ema is None:
        yield
    else:
        with run.ema.applied(run.net):
            yield


def _predict(run: _Run, split: str) -> tuple[np.ndarray, np.ndarray]:
    idx, logits, bad = predict_logits(run.net, run.dataset, run.splits[split], batch_size=run.config.micro_batch,
                                      device=run.device, precision=run.config.precision,
                                      workers=run.config.workers, seed=run.config.seed)
    run.record_failures(bad)
    return idx, logits


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
    state.history.append({"epoch": state.epoch + 1, "train_loss": float(np.mean(losses)) if losses else None,
                          "val_roc_auc": None if math.isnan(auc) else auc, "global_step": state.global_step})
    if improved:
        state.best_auc = None if math.isnan(auc) else auc  # None = no usable AUC yet; the next epoch may replace it
        state.best_epoch, state.epochs_since_best = state.epoch + 1, 0
    else:
        state.epochs_since_best += 1
    state.epoch += 1
    state.step_in_epoch = 0
    state.epoch_losses = []


# --------------------------------------------------------------------------------------- evaluation and export


class _FolderResults:
    """The ``results/<table>/part-*.parquet`` layout of a store, written into the run's ``--out``.

    It has the one method :func:`cxr_embed.evaluation.write_results` needs, so the run's tables are
    written by the same code (same schemas) whether or not a store is given.
    """

    def __init__(self, root: Path):
        self.root = root

    def write_results(self, table: str, data: Any) -> Path:
        from cxr_embed.store import RESULT_SCHEMAS, RESULTS_DIR, conform

        data = conform(data, RESULT_SCHEMAS[table], f"results/{table}")
        return write_parquet_atomic(data, self.root / RESULTS_DIR / table / f"part-{time.time_ns():020d}.parquet")


def _load_best(run: _Run) -> None:
    from safetensors.torch import load_file, save_file

    path = run.out / BEST_DIR / "model.safetensors"
    if not path.is_file():  # stopped by --max-steps before any validation: evaluate the current weights
        with _eval_weights(run):
            path.parent.mkdir(exist_ok=True)
            save_file(_cpu_state(run.net), path)
    run.net.load_state_dict(load_file(path, device=str(run.device)), strict=True)


def _finish(run: _Run, state: TrainState, status: str) -> FineTuneResult:
    """Best weights → temperature on validation → test metrics, tables, plots → exported model folder."""
    from cxr_embed import evaluation, metrics

    started = time.perf_counter()
    _load_best(run)   # already EMA-averaged when EMA is on
    val_idx, val_logits = _predict(run, "val")
    test_idx, test_logits = _predict(run, "test")
    if len(test_idx) == 0:
        raise EvaluationError("No test image could be decoded; see errors.parquet in the output folder.")
    y_val, y_test = run.targets[val_idx], run.targets[test_idx]
    calibrator = evaluation.fit_calibrator("temperature", expit(val_logits).ravel(), y_val.ravel().astype(np.int64))
    temperature = 1.0 / calibrator.a if calibrator is not None else 1.0
    p_val, p_test = expit(val_logits / temperature), expit(test_logits / temperature)
    results, preds, mets, summary = [], [], [], {}
    row_ids = _store_row_ids(run, test_idx)
    image_ids = [run.dataset.records[i].image_id for i in test_idx]
    for t, target in enumerate(run.names):
        yv, yt = y_val[:, t].astype(np.int64), y_test[:, t].astype(np.int64)
        if len(np.unique(yt)) < 2:
            continue   # a finding absent from the test split: no ROC-AUC to report
        m = metrics.evaluate_binary(yt, p_test[:, t], yv if len(np.unique(yv)) == 2 else None,
                                    p_val[:, t] if len(np.unique(yv)) == 2 else None,
                                    n_boot=run.config.n_boot, seed=run.config.seed)
        summary[target] = {k: v for k, v in m.values.items()}
        summary[target]["ci_low"], summary[target]["ci_high"] = m.auc_ci
        preds.append(evaluation.predictions_table(run.run_id, ARM, CLASSIFIER, target, np.zeros(len(yt)), row_ids,
                                                  image_ids, p_test[:, t], yt))
        for fold in (0, -1):   # one held-out test split: fold 0, and the same numbers as the pooled row
            mets.append(evaluation.metrics_table(run.run_id, ARM, CLASSIFIER, target, fold, m))
        results.append(evaluation.ModelResult(CLASSIFIER, target, np.asarray(test_idx), yt, p_test[:, t],
                                              np.zeros(len(yt), dtype=np.int64), [m], m, [m.thresholds],
                                              run.timings.get("train_s", 0.0)))
    meta = {k: np.array([getattr(r, k) for r in run.dataset.records], dtype=object) for k in ("sex", "age", "view")}
    mets += evaluation.subgroup_metrics_tables(run.run_id, ARM, evaluation.subgroup_table(results, meta))
    from cxr_embed import plots

    plot_files = plots.plot_run(run.out / "plots" / run.run_id, results) if results else []
    model_dir = export_model(run, temperature, state)
    run.timings["finish_s"] = time.perf_counter() - started
    params = {**dataclasses.asdict(run.config), "status": status, "started_at": run.created_at,
              "best_epoch": state.best_epoch,
              "best_val_roc_auc": state.best_auc, "global_step": state.global_step, "temperature": temperature,
              "n_images": _sizes(run), "base_model_id": run.base.model_id,
              "base_checkpoint_sha256": run.base.checkpoint_sha256, "model_dir": str(model_dir),
              "history": state.history}
    sinks: list[Any] = [_FolderResults(run.out)]
    if run.config.store:
        from cxr_embed.store import Store

        sinks.append(Store.open(run.config.store))
    for sink in sinks:
        evaluation.write_results(sink, run.run_id, "finetune", params, run.timings, preds, mets)
    _write_failures(run)
    result = FineTuneResult(status=status, run_id=run.run_id, out=run.out, state=state, model_dir=model_dir,
                            temperature=temperature, test_metrics=summary, n_images=_sizes(run),
                            failures=list(run.failures.values()), plots=[Path(p) for p in plot_files])
    write_json_atomic({k: v for k, v in dataclasses.asdict(result).items() if k != "state"}
                | {"history": state.history, "best_epoch": state.best_epoch, "best_val_roc_auc": state.best_auc}, run.out / "result.json")
    return result


def _store_row_ids(run: _Run, idx: np.ndarray) -> np.ndarray | None:
    """row_ids of the evaluated images in ``--store`` (matched by image_id); None without a store."""
    if not run.config.store:
        return None
    from cxr_embed.store import Store

    meta = Store.open(run.config.store).metadata(columns=["row_id", "image_id"])
    lookup = dict(zip(meta.column("image_id").to_pylist(), meta.column("row_id").to_pylist(), strict=True))
    return np.array([lookup.get(run.dataset.records[i].image_id) for i in idx], dtype=object)


def _write_failures(run: _Run) -> None:
    """``errors.parquet`` in the store's errors schema: every image that could not be read or decoded."""
    import pyarrow as pa

    from cxr_embed.store import ERRORS_SCHEMA

    rows = list(run.failures.values())
    now = [datetime.now(timezone.utc)] * len(rows)
    table = pa.table({**{c: [r[c] for r in rows] for c in ("image_id", "path", "stage", "reason")}, "run_at": now},
                     schema=ERRORS_SCHEMA)
    write_parquet_atomic(table, run.out / "errors.parquet")


def export_model(run: _Run, temperature: float, state: TrainState) -> Path:
    """Write the official model-folder layout (full key set) plus ``head.safetensors``/``head.json``.

    The folder is built beside the target and renamed into place, so a crash never leaves a
    half-written model that the strict loader would reject with a confusing message.
    """
    from safetensors.torch import save_file

    from cxr_embed.model.files import CHECKPOINT_RELPATH, CONFIG_NAME, TOKENIZER_RELPATH, sha256_file

    base_dir = Path(run.base.model_dir)
    # model_id is the NAME's slug up to any "(remark)": the suffix goes before it so the id changes.
    stem, paren, remark = run.base.config.name.partition("(")
    name = f"{stem.strip()} finetuned {run.run_id}" + (f" {paren}{remark}" if paren else "")
    text = (base_dir / CONFIG_NAME).read_text(encoding="utf-8")
    text, n = re.subn(r"(?m)^NAME:.*$", lambda _: "NAME: " + json.dumps(name), text, count=1)
    if n == 0:
        text = "NAME: " + json.dumps(name) + "\n" + text

    def build(tmp: Path) -> None:
        (tmp / CHECKPOINT_RELPATH).parent.mkdir(parents=True)
        shutil.copytree(base_dir / TOKENIZER_RELPATH, tmp / TOKENIZER_RELPATH)
        (tmp / CONFIG_NAME).write_text(text, encoding="utf-8")
        # Same tensor names, order, dtype and no metadata as the official file: only image_encoder.* changed.
        save_file(_cpu_state(run.base.module), tmp / CHECKPOINT_RELPATH)
        head = {"weight": run.net.head.weight.detach().cpu().contiguous(),
                "bias": run.net.head.bias.detach().cpu().contiguous(),
                "temperature": torch.tensor(temperature, dtype=torch.float32)}
        save_file(head, tmp / "head.safetensors")
        write_json_atomic({
            "targets": run.names, "label": run.config.label, "temperature": temperature,
            "probability": "sigmoid((features @ weight.T + bias) / temperature)",
            "features": "image_encoder.forward_features",
            "run_id": run.run_id, "best_epoch": state.best_epoch, "best_val_roc_auc": state.best_auc,
            "base_model_id": run.base.model_id, "base_checkpoint_sha256": run.base.checkpoint_sha256,
            "checkpoint_sha256": sha256_file(tmp / CHECKPOINT_RELPATH),
        }, tmp / "head.json")

    return replace_dir(run.out / MODEL_DIR, build)
