"""The parts of the GPU check that run without a GPU: its refusal on CPU and its parallel synthetic set."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from cxr_embed.synth import generate

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # a fresh interpreter importing torch
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_check_stops_at_once_without_cuda() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--n", "10"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "no CUDA device visible to torch" in result.stderr
    assert result.stdout == ""  # no table, no synthetic set written


def test_parallel_synthetic_images_are_the_serial_ones(tmp_path: Path) -> None:
    generate(tmp_path / "serial", 6, size=48, seed=3)
    generate(tmp_path / "parallel", 6, size=48, seed=3, workers=2)
    serial = sorted(p.relative_to(tmp_path / "serial") for p in (tmp_path / "serial").rglob("*.png"))
    assert len(serial) == 6
    for rel in serial:
        assert (tmp_path / "parallel" / rel).read_bytes() == (tmp_path / "serial" / rel).read_bytes()
    assert (tmp_path / "parallel" / "Data_Entry_2017_v2020.csv").read_text() == (
        tmp_path / "serial" / "Data_Entry_2017_v2020.csv"
    ).read_text()
