"""Images/s of `cxr-embed index` against the bare model forward and a naive one-image-at-a-time loop.

On the same N images (synthetic ChestX-ray14 PNGs, or ``--source``), for each device:

- ``bare forward``: ``encode_images`` on already decoded + preprocessed batches (the ceiling);
- ``index job``:    ``run_index`` into a fresh store (decode workers → forward → Parquet shards),
                    images/s of its embed loop; ``+index`` adds the FAISS build and store open;
- ``naive loop``:   per image read → preprocess → forward with batch 1, as the official wrapper does.

Pipeline overhead = bare_rate / job_rate - 1 (target ≤ 10%); speed-up = job_rate / naive_rate
(target ≥ 3x). ``--arch full`` uses the full-size architecture with random weights (no download;
~5 s per image forward on a 2-core CPU, so keep ``--n`` tiny there). ``--repeats R`` interleaves R
rounds of the three measurements and keeps each one's best rate (for busy, shared machines).

    python benchmarks/index_throughput.py --arch tiny --n 24 --devices cpu --repeats 2
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

from cxr_embed.imageio import read_image
from cxr_embed.job import IndexConfig, default_workers, run_index
from cxr_embed.model import MedImageInsight, tiny_model_dir
from cxr_embed.model.config import full_config
from cxr_embed.model.medimageinsight import resolve_device
from cxr_embed.model.unicl import UniCL
from cxr_embed.readers import read_dataset
from cxr_embed.synth import generate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", choices=("tiny", "full"), default="tiny", help="tiny (packaged model) or full (random weights)")
    p.add_argument("--n", type=int, default=32, help="images (default 32)")
    p.add_argument("--size", type=int, default=1024, help="synthetic PNG side in pixels (ChestX-ray14: 1024)")
    p.add_argument("--source", type=Path, default=None, help="use this dataset instead of synthetic images")
    p.add_argument("--devices", default=None, help="comma-separated, e.g. cpu,cuda (default: cpu, plus cuda when present)")
    p.add_argument("--precision", default="fp32", help="fp32, bf16 or fp16 (GPU)")
    p.add_argument("--batch-size", type=int, default=16, help="forward batch size for the job and the bare forward")
    p.add_argument("--workers", type=int, default=None, help="decode workers of the job (default: the job's choice)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each measurement; the best rate is kept (busy machines)")
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


def bare_forward_rate(model: MedImageInsight, paths: list[str], batch_size: int) -> float:
    pixels = torch.stack([model.preprocessor(read_image(p)) for p in paths])
    if model.device.type == "cuda":
        pixels = pixels.pin_memory()
    model.encode_images(pixels[:batch_size])  # warm-up (kernels, allocator)
    _sync(model)
    start = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        model.encode_images(pixels[i : i + batch_size])
    _sync(model)
    return len(pixels) / (time.perf_counter() - start)


def naive_rate(model: MedImageInsight, paths: list[str]) -> float:
    start = time.perf_counter()
    for p in paths:
        model.encode_images(model.preprocessor(read_image(p))[None])
    _sync(model)
    return len(paths) / (time.perf_counter() - start)


def job_rates(model: MedImageInsight, source: Path, n: int, args: argparse.Namespace) -> tuple[float, float, int]:
    workers = default_workers(model.device.type) if args.workers is None else args.workers
    config = IndexConfig(batch_size=args.batch_size, workers=workers, limit=n, device=str(model.device),
                         precision=model.precision)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = run_index(source, Path(tmp) / "store", config, progress=False, model=model)
        total = time.perf_counter() - start
    return summary.images_per_s, summary.embedded / total, workers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    devices = args.devices.split(",") if args.devices else ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        source = args.source or Path(tmp) / "synth"
        if args.source is None:
            generate(source, args.n, layout="chestxray14", seed=0, size=args.size)
        paths = [r.path for r in read_dataset(source)[: args.n]]
        for device in devices:
            model = load_model(args.arch, device, args.precision)
            bare = job = job_total = naive = 0.0
            for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit all three
                bare = max(bare, bare_forward_rate(model, paths, args.batch_size))
                rates = job_rates(model, source, len(paths), args)
                job, job_total, workers = max(job, rates[0]), max(job_total, rates[1]), rates[2]
                naive = max(naive, naive_rate(model, paths))
            row = {"arch": args.arch, "device": str(model.device), "precision": args.precision, "n": len(paths),
                   "batch_size": args.batch_size, "workers": workers, "cpu_threads": torch.get_num_threads(),
                   "bare_forward_ips": round(bare, 2), "job_ips": round(job, 2), "job_with_index_ips": round(job_total, 2),
                   "naive_ips": round(naive, 2), "overhead_pct": round(100 * (bare / job - 1), 1),
                   "speedup_vs_naive": round(job / naive, 2), "repeats": args.repeats}
            rows.append(row)
            if not args.json:
                print(f"{args.arch} on {row['device']} ({args.precision}, batch {args.batch_size}, {workers} workers, "
                      f"{len(paths)} images): bare forward {bare:.2f}/s | index job {job:.2f}/s "
                      f"({job_total:.2f}/s with index build) | naive loop {naive:.2f}/s | overhead "
                      f"{row['overhead_pct']}% (target <= 10) | {row['speedup_vs_naive']}x naive (target >= 3)", flush=True)
    if args.json:
        print(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
