"""Fine-tuning settings, run state and results, and their persistence (``config.json``, ``--resume``)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_embed.atomicio import write_json_atomic
from cxr_embed.errors import CheckpointError, ConfigError
from cxr_embed.precision import PRECISIONS

#: Options that may change when a run is resumed; everything else must match the interrupted run.
RUNTIME_FIELDS = frozenset({"max_steps", "workers", "device", "store", "source", "dataset", "evaluate_test"})
#: Exit status the CLI uses for a run stopped by SIGTERM with a checkpoint saved (EX_TEMPFAIL: "retry").
EXIT_INTERRUPTED = 75
ARM = "finetuned"
CLASSIFIER = "finetune"
CHECKPOINT_DIR = "checkpoint"
BEST_DIR = "best"
MODEL_DIR = "model"


@dataclass
class FineTuneConfig:
    """Every setting of a fine-tuning run (saved as ``config.json`` in the output folder)."""

    source: str
    out: str
    dataset: str = "auto"
    model_dir: str | None = None
    epochs: int = 10
    lr: float = 1e-5
    head_lr_scale: float = 1.0  # the head's learning rate is lr x this (1 = the study's single learning rate)
    min_lr: float = 0.0
    weight_decay: float = 0.2
    batch_size: int = 48  # images per optimizer step (the study's 48), split into `accumulate` micro-batches
    accumulate: int = 1
    warmup_fraction: float = 0.05  # linear warm-up over this share of all optimizer steps (at least 1 step)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds a GradScaler)
    grad_checkpointing: bool = False
    freeze_stages: int = 0
    label: str = "abnormal"  # abnormal | all-findings
    class_weighting: bool = False
    ema: float | None = None  # EMA decay of the weights (e.g. 0.999); evaluation and export use the EMA
    augment: bool = True
    hflip: bool = False
    patience: int = 3  # epochs without a better validation ROC-AUC before stopping
    max_steps: int | None = None  # stop after this many optimizer steps in total (schedule unchanged)
    val_fraction: float = 0.1
    test_fraction: float = 0.2  # only used when the records carry no official split
    clip_grad: float = 1.0
    workers: int = 0
    device: str = "auto"
    store: str | None = None
    seed: int = 0
    reader_options: dict[str, Any] = field(default_factory=dict)  # the reader's options (--labels, --key-file, …)
    n_boot: int = 1000
    # The evaluation plan (needs --store): an existing plan id, else the plan with these settings.
    plan: str | None = None
    split: str = "holdout"  # holdout | kfold | official (when a plan is made)
    folds: int = 5  # kfold plans: one model per fold
    where: str | None = None  # SQL condition on the store's images view
    sample: int | None = None  # stratified whole-patient subset of about this many images
    fold: int | None = None  # set by the K-fold driver: the fold this run holds out
    evaluate_test: bool = True  # False in a sweep cell: validation only, the test rows stay untouched

    def validate(self) -> None:
        """Refuse impossible option combinations before anything is loaded."""
        problems = []
        if self.precision not in PRECISIONS:
            problems.append(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.label not in ("abnormal", "all-findings"):
            problems.append(f"--label must be 'abnormal' or 'all-findings', not {self.label!r}")
        if self.batch_size < 1 or self.accumulate < 1 or self.batch_size % self.accumulate:
            problems.append(
                f"--batch-size ({self.batch_size}) must be a positive multiple of --accumulate "
                f"({self.accumulate}): each step is split into equal micro-batches"
            )
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
        if self.split not in ("holdout", "kfold", "official"):
            problems.append(f"--split must be holdout, kfold or official, not {self.split!r}")
        if (self.plan or self.where or self.sample) and not self.store:
            problems.append(
                "--plan, --where and --sample need --store (the evaluation plan lives in the store)"
            )
        if problems:
            raise ConfigError("Invalid fine-tuning options: " + "; ".join(problems) + ".")

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.accumulate


@dataclass
class TrainState:
    """Scalars that locate the run in time; saved as JSON in every checkpoint."""

    epoch: int = 0  # current epoch (0-based); equals `epochs` when training is complete
    step_in_epoch: int = 0  # optimizer steps already done in `epoch`
    global_step: int = 0
    best_auc: float | None = None
    best_epoch: int | None = None
    epochs_since_best: int = 0
    done: bool = False
    epoch_losses: list[float] = field(
        default_factory=list
    )  # this epoch's step losses so far (survive a resume)
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

    status: str  # "completed" | "early_stopped" | "max_steps" | "interrupted"
    run_id: str
    out: Path
    state: TrainState
    model_dir: Path | None = None
    temperature: float | None = None
    test_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    n_images: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # calibration problems: stored with the run, printed
    val_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    plan_id: str | None = None
    folds: list[FineTuneResult] = field(default_factory=list)  # K-fold plans: one result per fold


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
    return FineTuneConfig(
        **{k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items() if k in fields}
    )


def resume_config(out: str | Path, overrides: dict[str, Any]) -> FineTuneConfig:
    """The saved config with ``overrides`` applied; only :data:`RUNTIME_FIELDS` may differ.

    Changing a training setting mid-run would make the resumed run a different experiment whose
    numbers nobody could reproduce, so it is refused with the values side by side.
    """
    saved = load_run_config(out)
    clashes = [
        f"{k} (run: {getattr(saved, k)!r}, given: {v!r})"
        for k, v in overrides.items()
        if k not in RUNTIME_FIELDS and k != "out" and getattr(saved, k) != v
    ]
    if clashes:
        raise ConfigError(
            "--resume continues the run in "
            + str(out)
            + " with its own settings; these differ: "
            + "; ".join(clashes)
            + ". Drop them, or start a new run with another --out."
        )
    return dataclasses.replace(saved, **{k: v for k, v in overrides.items() if k in RUNTIME_FIELDS})
