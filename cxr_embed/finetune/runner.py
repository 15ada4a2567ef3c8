"""``finetune()``: set up (data, split, model, optimizer), resume, train, evaluate and export."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr_embed.atomicio import write_json_atomic
from cxr_embed.errors import CheckpointError, ConfigError, InputError
from cxr_embed.finetune.checkpoint import load_checkpoint
from cxr_embed.finetune.config import (
    CHECKPOINT_DIR,
    FineTuneConfig,
    FineTuneResult,
    StepInfo,
    TrainState,
    save_run_config,
)
from cxr_embed.finetune.data import ImageDataset, patient_splits, target_names, targets_of
from cxr_embed.finetune.evaluate import _finish
from cxr_embed.finetune.optim import EMA, FineTuneNet, freeze_stages, param_groups, warmup_steps
from cxr_embed.finetune.run import _Run, _sizes
from cxr_embed.finetune.train import _train
from cxr_embed.records import ImageRecord


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _labelled(records: list[ImageRecord], label: str) -> tuple[list[ImageRecord], np.ndarray]:
    targets = targets_of(records, label)
    keep = ~np.isnan(targets).any(axis=1)
    if not keep.any():
        what = "a Normal/Abnormal label" if label == "abnormal" else "the 14 finding flags"
        raise InputError(
            f"None of the {len(records)} images has {what}; fine-tuning needs labelled images "
            f"(ChestX-ray14 Data_Entry CSV, or a folder with a label CSV / class sub-folders)."
        )
    return [r for r, k in zip(records, keep, strict=True) if k], targets[keep]


def _splits_for(
    out: Path, records: list[ImageRecord], targets: np.ndarray, config: FineTuneConfig, resume: bool
) -> tuple[list[ImageRecord], np.ndarray, dict[str, np.ndarray]]:
    """The run's records, targets and train/val/test indices; written to ``splits.json``.

    With a plan the split is the plan's (its rows only); a resumed run without one reads its split
    back by image_id, so it survives a re-listed source folder.
    """
    path = out / "splits.json"
    if config.plan:
        records, targets, splits = _plan_splits(records, targets, config)
    else:
        pos = {r.image_id: i for i, r in enumerate(records)}
        if resume and path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            missing = [i for ids in saved.values() for i in ids if i not in pos]
            if missing:
                raise InputError(
                    f"{len(missing)} images of the interrupted run are gone from {config.source} "
                    f"(e.g. {missing[:3]}); resume needs the same images.",
                    config.source,
                )
            return (
                records,
                targets,
                {k: np.array([pos[i] for i in ids], dtype=np.int64) for k, ids in saved.items()},
            )
        splits = patient_splits(
            records,
            targets,
            val_fraction=config.val_fraction,
            test_fraction=config.test_fraction,
            seed=config.seed,
        )
    write_json_atomic({k: [records[i].image_id for i in v] for k, v in splits.items()}, path)
    return records, targets, splits


def _plan_splits(
    records: list[ImageRecord], targets: np.ndarray, config: FineTuneConfig
) -> tuple[list[ImageRecord], np.ndarray, dict[str, np.ndarray]]:
    """Train/val/test from the stored plan: a one-split plan's own, or fold ``config.fold`` of K folds
    as test with validation patients carved from the other folds."""
    from cxr_embed.plans import TEST, TRAIN, VAL, carve_patients, load_plan
    from cxr_embed.store import Store

    plan = load_plan(Store.open(config.store), config.plan)
    in_plan = {image_id: i for i, image_id in enumerate(plan.image_id)}
    keep = [i for i, r in enumerate(records) if r.image_id in in_plan]
    if len(keep) < len(plan):
        raise InputError(
            f"{len(plan) - len(keep)} of the {len(plan)} images of plan {plan.plan_id} are not "
            f"labelled images of {config.source}; fine-tune on the folder the store was indexed from.",
            config.source,
        )
    records, targets = [records[i] for i in keep], targets[keep]
    at = np.array([in_plan[r.image_id] for r in records])
    idx = np.arange(len(records))
    if plan.kind != "kfold":
        split = plan.split[at]
        return (
            records,
            targets,
            {"train": idx[split == TRAIN], "val": idx[split == VAL], "test": idx[split == TEST]},
        )
    fold = plan.fold[at]
    groups = np.array([r.patient_id or f"image:{r.image_id}" for r in records], dtype=object)
    rng = np.random.default_rng([config.seed, int(config.fold)])
    train, val = carve_patients(
        idx[fold != config.fold], groups, np.nansum(targets, axis=1) > 0, config.val_fraction, rng
    )
    return records, targets, {"train": train, "val": val, "test": idx[fold == config.fold]}


def _resolve_plan(config: FineTuneConfig) -> FineTuneConfig:
    """With ``--store`` and no ``--plan``: the store's plan with these settings (made the first time)."""
    if not config.store or config.plan:
        return config
    from cxr_embed.plans import PlanSettings, get_or_make_plan
    from cxr_embed.store import Store

    settings = PlanSettings(
        kind=config.split,
        folds=config.folds,
        test_fraction=config.test_fraction,
        val_fraction=config.val_fraction,
        seed=config.seed,
        where=config.where,
        sample=config.sample,
    )
    return dataclasses.replace(config, plan=get_or_make_plan(Store.open(config.store), settings).plan_id)


def _plan_folds(config: FineTuneConfig) -> list[int]:
    """The folds of a K-fold plan (empty for a one-split plan or no plan)."""
    if not config.plan or config.fold is not None:
        return []
    from cxr_embed.plans import load_plan
    from cxr_embed.store import Store

    plan = load_plan(Store.open(config.store), config.plan)
    return sorted(set(plan.fold.tolist())) if plan.kind == "kfold" else []


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
    from cxr_embed.results import new_run_id

    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    run_id = new_run_id("finetune")
    write_json_atomic({"run_id": run_id, "created_at": now}, path)
    return run_id, now


def _setup(config: FineTuneConfig, resume: bool) -> _Run:
    from cxr_embed.listing import list_source
    from cxr_embed.model import MedImageInsight

    out = Path(config.out)
    started = time.perf_counter()
    # the same listing as `index`: reader options, de-identification key, chest-only filter
    listing = list_source(config.source, config.dataset, options=config.reader_options)
    read_failures: list[Any] = list(listing.failures)
    records, targets = _labelled(listing.records, config.label)
    records, targets, splits = _splits_for(out, records, targets, config, resume)
    # the folds of a K-fold plan share the run id their driver wrote one folder up
    run_id, created_at = (
        _run_identity(out.parent, True) if config.fold is not None else _run_identity(out, resume)
    )
    base = MedImageInsight.load(config.model_dir, device=config.device, precision="fp32")
    device = base.device
    if config.precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            "fp16 training needs a CUDA GPU (it relies on a GradScaler); use bf16 or fp32 on CPU."
        )
    _seed_everything(
        config.seed
    )  # after the model build, so the head init and DropPath stream depend on the seed only
    encoder = base.module.image_encoder
    encoder.set_grad_checkpointing(config.grad_checkpointing)
    freeze_stages(encoder, config.freeze_stages)
    prior = targets[splits["train"]].mean(axis=0)
    net = FineTuneNet(encoder, encoder.num_features, len(target_names(config.label)), prior).to(device)
    net.train()
    groups = param_groups(list(net.named_parameters()), config.weight_decay, config.head_lr_scale)
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=config.lr, betas=(0.9, 0.999), eps=1e-8
    )
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    named = list(net.named_parameters())
    ema = EMA(named, config.ema) if config.ema is not None else None
    steps_per_epoch = math.ceil(len(splits["train"]) / config.batch_size)
    total = steps_per_epoch * config.epochs
    run = _Run(
        config=config,
        out=out,
        run_id=run_id,
        created_at=created_at,
        base=base,
        net=net,
        optimizer=optimizer,
        scaler=scaler,
        ema=ema,
        device=device,
        dataset=ImageDataset(records, targets, base.preprocessor),
        targets=targets,
        splits=splits,
        names=target_names(config.label),
        pos_weight=_pos_weight(targets[splits["train"]], device) if config.class_weighting else None,
        total_steps=total,
        warmup=warmup_steps(total, config.warmup_fraction),
    )
    for f in read_failures:
        run.failures.setdefault(
            f.image_id, {"image_id": f.image_id, "path": f.path, "stage": f.stage, "reason": f.reason}
        )
    run.timings["setup_s"] = time.perf_counter() - started
    return run


def finetune(
    config: FineTuneConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[StepInfo], None] | None = None,
) -> FineTuneResult:
    """Fine-tune, evaluate and export; see the module docstring. Safe to call again with ``resume=True``.

    On a K-fold plan this trains one model per fold (``OUT/fold-<k>``, one shared run id); a
    finished fold is not trained again on ``resume``. ``on_step`` is called after every optimizer
    step (logging, notebooks, tests).
    """
    config.validate()
    out = Path(config.out)
    if not resume and ((out / "config.json").exists() or (out / CHECKPOINT_DIR).exists()):
        raise ConfigError(
            f"{out} already holds a fine-tuning run. Pass --resume to continue it, or choose another --out."
        )
    if resume and not (out / "config.json").is_file():
        raise CheckpointError(f"{out} holds no fine-tuning run to resume; start one without --resume.")
    config = _resolve_plan(config)
    out.mkdir(parents=True, exist_ok=True)
    save_run_config(config)
    folds = _plan_folds(config)
    if folds:
        return _finetune_folds(config, folds, resume=resume, progress=progress, on_step=on_step)
    run = _setup(config, resume)
    state = TrainState()
    if resume and ((out / CHECKPOINT_DIR).exists() or (out / f"{CHECKPOINT_DIR}.old").exists()):
        state = load_checkpoint(out, net=run.net, optimizer=run.optimizer, scaler=run.scaler, ema=run.ema)
    status = _train(run, state, progress=progress, on_step=on_step)
    if status == "interrupted":
        return FineTuneResult(
            status=status,
            run_id=run.run_id,
            out=out,
            state=state,
            failures=list(run.failures.values()),
            n_images=_sizes(run),
            plan_id=config.plan,
        )
    return _finish(run, state, status)


def _finetune_folds(
    config: FineTuneConfig,
    folds: list[int],
    *,
    resume: bool,
    progress: bool,
    on_step: Callable[[StepInfo], None] | None,
) -> FineTuneResult:
    """One model per fold of a K-fold plan (a GPU job at full size); the result gathers the folds."""
    out = Path(config.out)
    run_id, _ = _run_identity(out, resume)
    results = []
    for k in folds:
        sub = out / f"fold-{k}"
        done = sub / "result.json"
        if done.is_file():  # finished before an interruption: never trained (or tested) twice
            saved = json.loads(done.read_text(encoding="utf-8"))
            results.append(
                FineTuneResult(
                    status=saved["status"],
                    run_id=run_id,
                    out=sub,
                    state=TrainState(),
                    test_metrics=saved["test_metrics"],
                    warnings=saved.get("warnings", []),
                    n_images=saved["n_images"],
                    plan_id=config.plan,
                )
            )
            continue
        fold_config = dataclasses.replace(config, out=str(sub), fold=k)
        results.append(
            finetune(fold_config, resume=(sub / "config.json").is_file(), progress=progress, on_step=on_step)
        )
        if results[-1].status == "interrupted":
            break
    last = results[-1]
    return FineTuneResult(
        status=last.status,
        run_id=run_id,
        out=out,
        state=last.state,
        model_dir=None,
        temperature=None,
        test_metrics={
            f"fold{k}/{t}": m for k, r in zip(folds, results, strict=False) for t, m in r.test_metrics.items()
        },
        n_images={"test": sum(r.n_images.get("test", 0) for r in results)},
        failures=[f for r in results for f in r.failures],
        warnings=[w for r in results for w in r.warnings],
        plan_id=config.plan,
        folds=results,
    )
