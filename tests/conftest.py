"""Shared fixtures: tiny real things (the tiny reference model, synthetic images, small stores) in tmp dirs.

Each area owns one marked section below; keep fixtures session-scoped when they are expensive.
"""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests when no CUDA device is present (CI has none)."""
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# --- section: model (issue 2) ---

# --- section: readers (issue 3) ---

# --- section: store (issue 4) ---

# --- section: classify (issue 5) ---

# --- section: search/sql (issue 6) ---

# --- section: finetune (issue 7) ---
