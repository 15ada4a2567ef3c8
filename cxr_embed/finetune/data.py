"""Fine-tuning data: targets, patient-wise splits, the seeded epoch order, batched inference.

Images are decoded by the shared :mod:`cxr_embed.decode` stage (as ``index`` and ``predict`` do), so a
file reads the same way, and fails with the same de-identified ``ReadFailure``, in every command.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from cxr_embed.errors import EvaluationError
from cxr_embed.plans import carve_patients
from cxr_embed.precision import autocast
from cxr_embed.records import FINDINGS, ImageRecord, ReadFailure

if TYPE_CHECKING:
    from cxr_embed.preprocessing import Preprocessor

# --------------------------------------------------------------------------------------- data


def target_names(label: str) -> list[str]:
    return ["abnormal"] if label == "abnormal" else list(FINDINGS)


def targets_of(records: Sequence[ImageRecord], label: str) -> np.ndarray:
    """(N, T) float32 targets; rows without the needed label are NaN (dropped by the caller)."""
    if label == "abnormal":
        return np.array([[np.nan if r.label is None else r.label] for r in records], dtype=np.float32)
    n = len(target_names(label))
    return np.array(
        [r.findings if r.findings is not None else (np.nan,) * n for r in records], dtype=np.float32
    )


def patient_splits(
    records: Sequence[ImageRecord],
    targets: np.ndarray,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, np.ndarray]:
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
        train, test = carve_patients(all_idx, groups, positive, test_fraction, rng)
    train, val = carve_patients(train, groups, positive, val_fraction, rng)
    shared = (
        (set(groups[train]) & set(groups[val]))
        | (set(groups[train]) & set(groups[test]))
        | (set(groups[val]) & set(groups[test]))
    )
    if shared:
        raise EvaluationError(
            f"{len(shared)} patients appear in more than one of train/validation/test "
            f"(e.g. {sorted(shared)[:3]}); the official split lists disagree with the patient ids."
        )
    for name, idx in (("train", train), ("validation", val), ("test", test)):
        if len(idx) == 0:
            raise EvaluationError(
                f"The {name} split is empty ({len(records)} labelled images, "
                f"{len(set(groups))} patients); fine-tuning needs more patients."
            )
    return {"train": train, "val": val, "test": test}


def epoch_batches(n: int, epoch: int, seed: int, batch_size: int) -> list[np.ndarray]:
    """The optimizer steps of one epoch: a permutation seeded by ``(seed, epoch)`` cut into batches."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def decode_loader(
    records: Sequence[ImageRecord],
    preprocessor: Preprocessor,
    batches: list[list[int]],
    *,
    workers: int,
    seed: int,
    device: torch.device,
) -> torch.utils.data.DataLoader:
    """The shared decode stage (:func:`cxr_embed.decode.make_loader`) over explicit, seeded batches.

    ``batches`` fix the order (the data order of an epoch is a function of the seed only), and the
    loader's own generator is seeded: otherwise the DataLoader would draw its worker seed from torch's
    global RNG, which DropPath also uses, and a resumed run would see a different DropPath stream.
    Failures come back as ``ReadFailure`` rows (stage "decode") that name no real path.
    """
    from cxr_embed.decode import make_loader

    return make_loader(
        records, preprocessor, batches=batches, workers=workers, pin_memory=device.type == "cuda", seed=seed
    )


# --------------------------------------------------------------------------------------- evaluation helpers


@torch.no_grad()
def predict_logits(
    net: nn.Module,
    records: Sequence[ImageRecord],
    preprocessor: Preprocessor,
    indices: np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
    precision: str,
    workers: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, list[ReadFailure]]:
    """Eval-mode logits for ``records[indices]``: (indices that decoded, (n, T) float64 logits, failures)."""
    was_training = net.training
    net.eval()
    batches = [indices[i : i + batch_size].tolist() for i in range(0, len(indices), batch_size)]
    kept: list[int] = []
    outs: list[np.ndarray] = []
    failed: list[ReadFailure] = []
    try:
        for batch in decode_loader(records, preprocessor, batches, workers=workers, seed=seed, device=device):
            failed.extend(batch.failures)
            if batch.pixels is None:
                continue
            x = preprocessor.normalize(batch.pixels.to(device, non_blocking=True))
            with autocast(device.type, precision):
                logits = net(x)
            kept.extend(batch.indices)
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
