"""Exact-resume checkpoints (safetensors + JSON, no pickle) and the exported model folder."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from cxr_embed.atomicio import replace_dir, write_json_atomic
from cxr_embed.errors import CheckpointError
from cxr_embed.finetune.config import CHECKPOINT_DIR, MODEL_DIR, TrainState
from cxr_embed.finetune.optim import EMA

if TYPE_CHECKING:
    from cxr_embed.finetune.run import _Run

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
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]
    ]
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
    tensors = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)),
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    py = random.getstate()
    meta = {
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py[0], list(py[1]), py[2]],
    }
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


def save_checkpoint(
    out: Path,
    *,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    ema: EMA | None,
    state: TrainState,
) -> Path:
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
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in ema.shadow.items()}, tmp / "ema.safetensors"
            )
        rng_tensors, rng_meta = _rng_state()
        save_file(rng_tensors, tmp / "rng.safetensors")
        write_json_atomic(
            {
                "train": dataclasses.asdict(state),
                "optimizer": opt_meta,
                "rng": rng_meta,
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            },
            tmp / "state.json",
        )

    return replace_dir(out / CHECKPOINT_DIR, build)


def load_checkpoint(
    out: Path, *, net: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, ema: EMA | None
) -> TrainState:
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
        optimizer.load_state_dict(
            _unflatten_optimizer(load_file(ckpt / "optimizer.safetensors"), meta["optimizer"])
        )
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
        raise CheckpointError(
            f"Checkpoint {ckpt} is unreadable or does not match this model ({exc}). "
            f"Start a fresh run with another --out."
        ) from None


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
        head = {
            "weight": run.net.head.weight.detach().cpu().contiguous(),
            "bias": run.net.head.bias.detach().cpu().contiguous(),
            "temperature": torch.tensor(temperature, dtype=torch.float32),
        }
        save_file(head, tmp / "head.safetensors")
        write_json_atomic(
            {
                "targets": run.names,
                "label": run.config.label,
                "temperature": temperature,
                "probability": "sigmoid((features @ weight.T + bias) / temperature)",
                "features": "image_encoder.forward_features",
                "run_id": run.run_id,
                "best_epoch": state.best_epoch,
                "best_val_roc_auc": state.best_auc,
                "base_model_id": run.base.model_id,
                "base_checkpoint_sha256": run.base.checkpoint_sha256,
                "checkpoint_sha256": sha256_file(tmp / CHECKPOINT_RELPATH),
            },
            tmp / "head.json",
        )

    return replace_dir(run.out / MODEL_DIR, build)
