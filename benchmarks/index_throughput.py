"""Images/s of `cxr-embed index` against the sum of its parts, the bare forward and a naive loop.

On the same N images (synthetic ChestX-ray14 PNGs, or ``--source``), for each device:

- ``decode``:       cxr_embed.decode (read + resize to uint8) + normalise, one image at a time, one process;
- ``bare forward``: ``encode_images`` on those preprocessed batches at ``--batch-size`` (and at batch 1);
- ``bound``:        N / (decode time + bare-forward time): the sum of the parts run one after the other;
- ``index job``:    ``run_index`` into a fresh store (decode workers → forward → writer thread), images/s
                    of its embed loop; ``+index`` adds the FAISS build and store open;
- ``naive loop``:   per image read → preprocess → forward with batch 1, as the official wrapper does.

Targets: job ≥ 0.9 × bound (within 10% of the sum of parts; decode workers can beat it), and
job / naive ≥ the bare forward's own batching gain (bare at ``--batch-size`` / bare at batch 1).
``--arch full`` uses the full-size architecture with random weights (no download; ~5 s per image
forward on a 2-core CPU, so keep ``--n`` tiny there). ``--repeats R`` interleaves R rounds of the
measurements and keeps each one's best rate (for busy, shared machines).

    python benchmarks/index_throughput.py --arch tiny --n 64 --batch-size 16 --devices cpu --repeats 2
    python benchmarks/index_throughput.py --arch full --n 8 --batch-size 8 --devices cpu
    python benchmarks/index_throughput.py --arch full --n 512 --batch-size 64 --precision bf16   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from cxr_embed.decode import decode_image
from cxr_embed.imageio import read_image
from cxr_embed.job import IndexConfig, run_index
from cxr_embed.local_engine import default_workers
from cxr_embed.model import MedImageInsight, tiny_model_dir
from cxr_embed.model.config import full_config
from cxr_embed.model.medimageinsight import resolve_device
from cxr_embed.model.unicl import UniCL
from cxr_embed.readers import read_dataset
from cxr_embed.synth import generate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--arch",
        choices=("tiny", "full"),
        default="tiny",
        help="tiny (packaged model) or full (random weights)",
    )
    p.add_argument("--n", type=int, default=32, help="images (default 32)")
    p.add_argument("--size", type=int, default=1024, help="synthetic PNG side in pixels (ChestX-ray14: 1024)")
    p.add_argument("--source", type=Path, default=None, help="use this dataset instead of synthetic images")
    p.add_argument(
        "--devices",
        default=None,
        help="comma-separated, e.g. cpu,cuda (default: cpu, plus cuda when present)",
    )
    p.add_argument("--precision", default="fp32", help="fp32, bf16 or fp16 (GPU)")
    p.add_argument(
        "--batch-size", type=int, default=16, help="forward batch size for the job and the bare forward"
    )
    p.add_argument(
        "--workers", type=int, default=None, help="decode workers of the job (default: the job's choice)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of each measurement; the best rate is kept (busy machines)",
    )
    p.add_argument("--skip-batch1", action="store_true", help="skip the bare forward at batch 1 (saves time)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    return p.parse_args(argv)


def load_model(arch: str, device: str, precision: str) -> MedImageInsight:
    if arch == "tiny":
        return MedImageInsight.load(tiny_model_dir(), device=device, precision=precision)
    dev = resolve_device(device)
    torch.manual_seed(0)
    with torch.device(dev):
        module = UniCL(full_config()).eval()
    return MedImageInsight(module, Path("random-weights"), "random-weights", dev, precision)


def _sync(model: MedImageInsight) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def decode_seconds(model: MedImageInsight, paths: list[str]) -> tuple[float, torch.Tensor]:
    """Seconds to decode + preprocess ``paths`` one by one in this process, and the (N, 3, S, S) result."""
    start = time.perf_counter()
    pixels = torch.stack([model.preprocessor.normalize(decode_image(p, model.preprocessor)) for p in paths])
    return time.perf_counter() - start, pixels


def bare_forward_seconds(model: MedImageInsight, pixels: torch.Tensor, batch_size: int) -> float:
    """Seconds of ``encode_images`` over ``pixels`` in batches (after one untimed warm-up batch)."""
    if model.device.type == "cuda":
        pixels = pixels.pin_memory()
    warm = (
        batch_size if model.device.type == "cuda" else 1
    )  # CPU: one image warms up; a batch would cost minutes
    model.encode_images(pixels[:warm])  # warm-up (kernels, allocator)
    _sync(model)
    start = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        model.encode_images(pixels[i : i + batch_size])
    _sync(model)
    return time.perf_counter() - start


def naive_rate(model: MedImageInsight, paths: list[str]) -> float:
    start = time.perf_counter()
    for p in paths:
        model.encode_images(model.preprocessor(read_image(p))[None])
    _sync(model)
    return len(paths) / (time.perf_counter() - start)


def job_rates(
    model: MedImageInsight, source: Path, n: int, args: argparse.Namespace
) -> tuple[float, float, int]:
    workers = default_workers(model.device.type) if args.workers is None else args.workers
    config = IndexConfig(
        batch_size=args.batch_size,
        workers=workers,
        limit=n,
        device=str(model.device),
        precision=model.precision,
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = run_index(source, Path(tmp) / "store", config, progress=False, model=model)
        total = time.perf_counter() - start
    return summary.images_per_s, summary.embedded / total, workers


def measure(model: MedImageInsight, source: Path, paths: list[str], args: argparse.Namespace) -> dict:
    """One row of figures for ``model`` (best of ``args.repeats`` interleaved rounds)."""
    n, bs = len(paths), args.batch_size
    best = {
        "decode_s": float("inf"),
        "bare_s": float("inf"),
        "bare1_s": float("inf"),
        "job": 0.0,
        "job_total": 0.0,
        "naive": 0.0,
    }
    for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit all of them
        dec, pixels = decode_seconds(model, paths)
        best["decode_s"] = min(best["decode_s"], dec)
        best["bare_s"] = min(best["bare_s"], bare_forward_seconds(model, pixels, bs))
        if not args.skip_batch1:
            best["bare1_s"] = min(best["bare1_s"], bare_forward_seconds(model, pixels, 1))
        job, job_total, workers = job_rates(model, source, n, args)
        best["job"], best["job_total"] = max(best["job"], job), max(best["job_total"], job_total)
        best["naive"] = max(best["naive"], naive_rate(model, paths))
    bare, bound = n / best["bare_s"], n / (best["decode_s"] + best["bare_s"])
    bare1 = n / best["bare1_s"] if best["bare1_s"] != float("inf") else None
    job, naive = best["job"], best["naive"]
    return {
        "arch": args.arch,
        "device": str(model.device),
        "precision": model.precision,
        "n": n,
        "batch_size": bs,
        "workers": workers,
        "cpu_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "decode_ips": round(n / best["decode_s"], 2),
        "bare_forward_ips": round(bare, 3),
        "bare_forward_b1_ips": round(bare1, 3) if bare1 else None,
        "bound_ips": round(bound, 3),
        "job_ips": round(job, 3),
        "job_with_index_ips": round(best["job_total"], 3),
        "naive_ips": round(naive, 3),
        "job_vs_bound": round(job / bound, 3),
        "bare_overhead_pct": round(100 * (bare / job - 1), 1),
        "speedup_vs_naive": round(job / naive, 2),
        "bare_batching_gain": round(bare / bare1, 2) if bare1 else None,
    }


def report(row: dict) -> str:
    gain = f"{row['bare_batching_gain']}x" if row["bare_batching_gain"] else "not measured"
    return (
        f"{row['arch']} on {row['device']} ({row['precision']}, batch {row['batch_size']}, {row['workers']} workers, "
        f"{row['n']} images, {row['cpu_threads']} threads)\n"
        f"  decode+preprocess {row['decode_ips']}/s | bare forward {row['bare_forward_ips']}/s "
        f"(batch 1: {row['bare_forward_b1_ips']}/s) | sum-of-parts bound {row['bound_ips']}/s\n"
        f"  index job {row['job_ips']}/s ({row['job_with_index_ips']}/s with index build) | "
        f"naive loop {row['naive_ips']}/s\n"
        f"  job / bound = {row['job_vs_bound']} (target >= 0.9) | job / naive = {row['speedup_vs_naive']}x "
        f"(target >= bare batching gain {gain}) | bare forward over job: {row['bare_overhead_pct']}%"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    devices = (
        args.devices.split(",") if args.devices else ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = args.source or Path(tmp) / "synth"
        if args.source is None:
            generate(source, args.n, layout="chestxray14", seed=0, size=args.size)
        paths = [r.path for r in read_dataset(source)[: args.n]]
        for device in devices:
            row = measure(load_model(args.arch, device, args.precision), source, paths, args)
            rows.append(row)
            if not args.json:
                print(report(row), flush=True)
    if args.json:
        print(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
