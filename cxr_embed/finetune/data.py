"""Fine-tuning data: targets, patient-wise splits, the seeded epoch order, decoding, batched inference."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from cxr_embed.errors import EvaluationError, InputError
from cxr_embed.plans import carve_patients
from cxr_embed.precision import autocast
from cxr_embed.records import FINDINGS, ImageRecord

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
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin,
        generator=torch.Generator().manual_seed(seed),
    )


# --------------------------------------------------------------------------------------- evaluation helpers


@torch.no_grad()
def predict_logits(
    net: nn.Module,
    dataset: ImageDataset,
    indices: np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
    precision: str,
    workers: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Eval-mode logits for ``dataset[indices]``: (indices that decoded, (n, T) float64 logits, failures)."""
    was_training = net.training
    net.eval()
    batches = [indices[i : i + batch_size].tolist() for i in range(0, len(indices), batch_size)]
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
