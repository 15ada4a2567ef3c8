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

from cxr_embed.finetune.checkpoint import export_model, load_checkpoint, save_checkpoint
from cxr_embed.finetune.config import (
    ARM,
    CLASSIFIER,
    EXIT_INTERRUPTED,
    RUNTIME_FIELDS,
    FineTuneConfig,
    FineTuneResult,
    StepInfo,
    TrainState,
    load_run_config,
    resume_config,
    save_run_config,
)
from cxr_embed.finetune.data import epoch_batches, patient_splits, targets_of
from cxr_embed.finetune.optim import (
    EMA,
    FineTuneNet,
    augment_batch,
    freeze_stages,
    lr_at,
    no_weight_decay,
    param_groups,
    step_generator,
)
from cxr_embed.finetune.runner import finetune

__all__ = [
    "ARM",
    "CLASSIFIER",
    "EMA",
    "EXIT_INTERRUPTED",
    "RUNTIME_FIELDS",
    "FineTuneConfig",
    "FineTuneNet",
    "FineTuneResult",
    "StepInfo",
    "TrainState",
    "augment_batch",
    "epoch_batches",
    "export_model",
    "finetune",
    "freeze_stages",
    "load_checkpoint",
    "load_run_config",
    "lr_at",
    "no_weight_decay",
    "param_groups",
    "patient_splits",
    "resume_config",
    "save_checkpoint",
    "save_run_config",
    "step_generator",
    "targets_of",
]
