"""The one precision vocabulary: fp32 (exact), bf16 and fp16 (autocast).

Why here: the model, the index job, fine-tuning, predict and the CLI all accept ``--precision``;
they must accept the same names and refuse the same combinations with the same message.
torch is imported lazily so the CLI can list the names without importing it.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from cxr_embed.errors import ConfigError

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
PRECISION_HELP = "fp32 (exact), or autocast bf16 (CPU/GPU) / fp16 (GPU only) for speed."


def check_precision(precision: str, device_type: str) -> None:
    """Refuse unknown names and fp16 off CUDA (CPU autocast has no fp16 path worth using)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"Unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    if precision == "fp16" and device_type != "cuda":
        raise ConfigError("fp16 autocast needs a CUDA GPU; use bf16 or fp32 on CPU.")


def autocast_dtype(precision: str) -> Any:
    """The torch dtype autocast runs in, or None for fp32."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def autocast(device_type: str, precision: str) -> Any:
    """An autocast context for ``precision`` on ``device_type`` (fp32: a no-op context)."""
    import torch

    dtype = autocast_dtype(precision)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)
