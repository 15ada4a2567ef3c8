"""Strict checkpoint loading: safetensors only, exact key set, exact shapes, float32.

The official loader loads with ``strict=False`` and returns silently when the file is missing, so
a typo in a path or a key prefix gives a *random* model that still produces embeddings. Here every
such case raises :class:`CheckpointError` naming the problem. The only tolerance is for the legacy
names the official loader also maps (``visual.``/``text.`` prefixes, ``vision_projection``/
``text_projection`` and the old DaViT sub-module names), which are renamed before checking.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import torch
from torch import nn

from cxr_embed.errors import CheckpointError

_TOP_LEVEL_RENAMES = (
    ("visual.", "image_encoder."),
    ("text.", "lang_encoder."),
)
_EXACT_RENAMES = {"vision_projection": "image_projection", "text_projection": "lang_projection"}

# Old DaViT layout: main_blocks.<stage>.<unit>.<0 spatial | 1 channel>.<part>
_LEGACY_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.([01])\.(cpe\.0\.proj|cpe\.1\.proj|attn|mlp|norm1|norm2)\.")
_LEGACY_PARTS = {
    "cpe.0.proj": "conv1.fn.dw",
    "cpe.1.proj": "conv2.fn.dw",
    "attn": "{attn}.fn",
    "mlp": "ffn.fn.net",
    "norm1": "{attn}.norm",
    "norm2": "ffn.norm",
}
_MAX_LISTED = 8


def _rename_davit_key(key: str) -> str:
    """Map an old DaViT sub-name (relative to the image tower) to the current one."""
    if key.startswith("conv_embeds."):
        key = "convs." + key[len("conv_embeds."):]
    if key.startswith("main_blocks."):
        key = "blocks." + key[len("main_blocks."):]
    match = _LEGACY_BLOCK.match(key)
    if match is None:
        return key
    stage, unit, kind, part = match.groups()
    block, attn = ("spatial_block", "window_attn") if kind == "0" else ("channel_block", "channel_attn")
    new = f"blocks.{stage}.{unit}.{block}.{_LEGACY_PARTS[part].format(attn=attn)}."
    return new + key[match.end():]


def rename_legacy_key(key: str) -> str:
    """The current name of a checkpoint key; current names are returned unchanged."""
    if key in _EXACT_RENAMES:
        return _EXACT_RENAMES[key]
    for old, new in _TOP_LEVEL_RENAMES:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    if key.startswith("image_encoder."):
        key = "image_encoder." + _rename_davit_key(key[len("image_encoder."):])
    return key


def _check_is_safetensors(path: Path) -> None:
    """Refuse pickles and other formats *before* handing the file to any parser."""
    with path.open("rb") as fh:
        head = fh.read(9)
    if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
        raise CheckpointError(
            f"{path} is a pickle / torch.save file. cxr-embed only loads safetensors checkpoints, because "
            "unpickling can run arbitrary code. Convert it once with safetensors.torch.save_file, or use "
            "the official file (safetensors despite its .pt suffix)."
        )
    size = path.stat().st_size
    header_len = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
    if len(head) < 9 or head[8:9] != b"{" or header_len + 8 > size:
        raise CheckpointError(f"{path} is not a safetensors file (bad header); the checkpoint is corrupt or "
                              "of another format. Re-download it with `cxr-embed model pull`.")


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint, with legacy names mapped to current ones."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint not found: {path}. The model folder must contain vision_model/medimageinsigt-v1.0.0.pt "
            "(run `cxr-embed model pull`, or check --model-dir)."
        )
    _check_is_safetensors(path)
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:  # safetensors raises its own error types; all mean "unreadable"
        raise CheckpointError(f"{path} could not be read as safetensors: {exc}") from None
    tensors: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        new = rename_legacy_key(key)
        if new in tensors:
            raise CheckpointError(f"{path} holds both a legacy and a current name for {new!r}; keep only one.")
        tensors[new] = value
    return tensors


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" … and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {title} ({len(items)}): {shown}{more}"


def check_state_dict(expected: dict[str, torch.Size], found: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointError` listing missing, unexpected, mis-shaped and non-float32 tensors."""
    missing = [k for k in expected if k not in found]
    unexpected = sorted(k for k in found if k not in expected)
    shapes = [f"{k} {list(found[k].shape)} (model expects {list(expected[k])})"
              for k in expected if k in found and found[k].shape != expected[k]]
    dtypes = [f"{k} {str(found[k].dtype).replace('torch.', '')}"
              for k in expected if k in found and found[k].dtype != torch.float32]
    problems = []
    if missing:
        problems.append(_listing("missing keys", missing))
    if unexpected:
        problems.append(_listing("unexpected keys", unexpected))
    if shapes:
        problems.append(_listing("wrong shapes", shapes))
    if dtypes:
        problems.append(_listing("not float32", dtypes))
    if not problems:
        return
    hint = ""
    if missing and unexpected and len(missing) == len(expected):
        hint = ("\nNo key matched: the names carry a prefix the model does not use (e.g. 'module.'); the checkpoint "
                "must use the official names (image_encoder.*, lang_encoder.*, image_projection, …).")
    raise CheckpointError(
        f"{source} does not match the model architecture in config.yaml; refusing to load a partly random "
        "model:\n" + "\n".join(problems) + hint
    )


def load_checkpoint(module: nn.Module, path: str | Path) -> None:
    """Load ``path`` into ``module`` strictly. ``module`` may live on the meta device (no double memory)."""
    tensors = read_checkpoint(path)
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_state_dict(expected, tensors, str(path))
    module.load_state_dict(tensors, strict=True, assign=True)


def manifest_of(module: nn.Module) -> list[dict[str, object]]:
    """Keys, shapes and dtypes in state_dict order (the format of ``full-v1.0.0-manifest.json``)."""
    return [{"key": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
            for k, v in module.state_dict().items()]

