"""One GPU check for a lent CUDA machine (≤ 8 min, run by ``benchmarks/gpu_check.sh``); prints one table.

1. parity: CUDA fp32 and bf16 embeddings against the CPU fp32 reference — the packaged tiny model on
   the reference images (and the stored golden embeddings), and the full-size architecture (random
   weights, seed 0) on a few synthetic 1024² X-rays;
2. throughput: the index job (full-size architecture, random weights) at batch 64/128 with 8 and 14
   decode workers on ``--n`` synthetic 1024² PNGs (``cxr_embed.synth``, written in parallel), against
   the bare forward on preprocessed batches (same batch size) and the naive one-image-at-a-time loop;
   targets: job ≥ 3× naive and ≤ 10% below the bare forward;
3. search: faiss-gpu flat inner-product latency at ``--rows`` × 1024 (1 query and 1,024 queries, k=10).

Without CUDA it stops at once (exit 2) with a message: a CPU run would only measure the wrong thing.

    bash benchmarks/gpu_check.sh                       # the whole check, defaults of the issue
    python benchmarks/gpu_check.py --n 2000 --skip-parity   # a quicker throughput-only look
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REFERENCE = Path(__file__).resolve().parent.parent / "tests" / "data" / "reference"
NO_CUDA = 2
SEARCH_RESERVE_S = 45


@dataclass
class Row:
    check: str
    setting: str
    value: str
    target: str = ""
    ok: bool | None = None

    def cells(self) -> list[str]:
        return [
            self.check,
            self.setting,
            self.value,
            self.target,
            {True: "ok", False: "MISS", None: ""}[self.ok],
        ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--n", type=int, default=20_000, help="synthetic 1024² PNGs for the job (default 20,000)")
    p.add_argument("--size", type=int, default=1024, help="synthetic image side (default 1024)")
    p.add_argument("--batch-sizes", default="64,128", help="job / bare forward batch sizes")
    p.add_argument("--workers", default="8,14", help="decode worker counts of the job")
    p.add_argument("--precision", default="bf16", help="precision of the throughput runs (fp32, bf16, fp16)")
    p.add_argument("--naive-n", type=int, default=256, help="images for the naive one-at-a-time loop")
    p.add_argument("--bare-n", type=int, default=1024, help="preprocessed images for the bare forward")
    p.add_argument("--rows", type=int, default=112_000, help="vectors in the FAISS flat search check")
    p.add_argument("--skip-parity", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-search", action="store_true")
    p.add_argument(
        "--budget", type=float, default=440, help="seconds for the whole check; job runs shrink to fit"
    )
    p.add_argument(
        "--data", type=Path, default=None, help="reuse/keep the synthetic set here (default: a temp dir)"
    )
    return p.parse_args(argv)


def require_cuda() -> None:
    """Exit 2 with a clear message when no CUDA device is visible (checked before any work)."""
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device visible to torch "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). "
            "This check only means something on a GPU; run it on a CUDA machine.",
            file=sys.stderr,
        )
        sys.exit(NO_CUDA)


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- parity


def _compare(name: str, setting: str, got, want, tol: float) -> list[Row]:
    import numpy as np

    diff = float(np.abs(got - want).max())
    cos = float((got * want).sum(axis=1).min())  # both L2-normalised
    return [
        Row(
            f"parity {name}",
            setting,
            f"max|d| {diff:.2e}, min cos {cos:.6f}",
            f"max|d| < {tol:g}",
            diff < tol,
        )
    ]


def parity(paths: list[str]) -> list[Row]:
    import numpy as np
    import torch
    from index_throughput import load_model

    from cxr_embed.model import MedImageInsight, tiny_model_dir

    rows: list[Row] = []
    levels = torch.from_numpy(np.load(REFERENCE / "preprocessed_uint8.npz")["levels"])
    golden = np.load(REFERENCE / "image_embeddings.npy")
    cpu = MedImageInsight.load(tiny_model_dir(), device="cpu")
    ref = cpu.encode_images(cpu.preprocessor.normalize(levels)).numpy()
    rows += _compare("tiny", "cpu fp32 vs golden", ref, golden, 1e-5)
    for precision, tol in (("fp32", 1e-3), ("bf16", 3e-2)):
        gpu = MedImageInsight.load(tiny_model_dir(), device="cuda", precision=precision)
        x = gpu.preprocessor.normalize(levels.cuda())  # the job's path: uint8 → device → normalise
        rows += _compare("tiny", f"cuda {precision} vs cpu fp32", gpu.encode_images(x).numpy(), ref, tol)
    from cxr_embed.decode import decode_image

    cpu_full = load_model("full", "cpu", "fp32")
    pixels = torch.stack([decode_image(p, cpu_full.preprocessor) for p in paths])
    ref = cpu_full.encode_images(cpu_full.preprocessor.normalize(pixels)).numpy()
    for precision, tol in (("fp32", 1e-3), ("bf16", 5e-2)):
        gpu = load_model("full", "cuda", precision)
        rows += _compare(
            "full (random w.)",
            f"cuda {precision} vs cpu fp32, {len(paths)} images",
            gpu.encode_images(gpu.preprocessor.normalize(pixels.cuda())).numpy(),
            ref,
            tol,
        )
        del gpu
    torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------- throughput


def throughput(source: Path, args: argparse.Namespace, deadline: float) -> list[Row]:
    import torch
    from index_throughput import bare_forward_seconds, decode_seconds, load_model, naive_rate

    from cxr_embed.job import IndexConfig, run_index
    from cxr_embed.readers import read_dataset

    rows: list[Row] = []
    model = load_model("full", "cuda", args.precision)
    paths = [r.path for r in read_dataset(source)]
    batch_sizes, worker_counts = (
        [int(b) for b in args.batch_sizes.split(",")],
        [int(w) for w in args.workers.split(",")],
    )
    naive = naive_rate(model, paths[: args.naive_n])
    rows.append(Row("naive loop", f"batch 1, {args.precision}, {args.naive_n} images", f"{naive:,.0f} img/s"))
    log(f"naive loop {naive:,.1f}/s")
    _, pixels = decode_seconds(model, paths[: args.bare_n])
    runs_left = len(batch_sizes) * len(worker_counts)
    for bs in batch_sizes:
        bare = args.bare_n / bare_forward_seconds(model, pixels, bs)
        rows.append(Row("bare forward", f"batch {bs}, {args.precision}", f"{bare:,.0f} img/s"))
        log(f"bare forward batch {bs}: {bare:,.1f}/s")
        for workers in worker_counts:
            seconds = max(5.0, (deadline - time.perf_counter() - SEARCH_RESERVE_S) / runs_left)
            limit = min(len(paths), max(bs * 4, int(0.8 * bare * seconds)))  # fits even at the bare rate
            config = IndexConfig(
                device="cuda",
                precision=args.precision,
                batch_size=bs,
                workers=workers,
                shard_size=4096,
                limit=limit,
            )
            with tempfile.TemporaryDirectory() as tmp:
                summary = run_index(source, Path(tmp) / "store", config, progress=False, model=model)
            runs_left -= 1
            job = summary.images_per_s
            log(f"job batch {bs}, {workers} workers: {job:,.1f}/s ({summary.embedded} images)")
            rows.append(
                Row(
                    "index job",
                    f"batch {bs}, {workers} workers, {summary.embedded} images",
                    f"{job:,.0f} img/s = {job / naive:.1f}x naive, {100 * (1 - job / bare):.1f}% below bare",
                    ">= 3x naive, <= 10% below bare",
                    job >= 3 * naive and job >= 0.9 * bare,
                )
            )
    del model, pixels
    torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------- search


def search(rows_n: int) -> list[Row]:
    import faiss
    import numpy as np

    from cxr_embed.indexes import gpu_available

    if not gpu_available():
        return [
            Row(
                "faiss flat search",
                f"{rows_n:,} x 1024",
                "faiss has no GPU support here (faiss-cpu build)",
                "faiss-gpu",
                False,
            )
        ]
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((rows_n, 1024), dtype=np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, faiss.IndexFlatIP(1024))
    index.add(xb)
    out = []
    for nq in (1, 1024):
        q = xb[rng.integers(0, rows_n, nq)]
        index.search(q, 10)  # warm-up
        times = []
        for _ in range(20):
            start = time.perf_counter()
            index.search(q, 10)
            times.append(time.perf_counter() - start)
        ms = 1000 * statistics.median(times)
        out.append(
            Row(
                "faiss-gpu flat",
                f"{rows_n:,} x 1024, {nq} quer{'y' if nq == 1 else 'ies'}, k=10",
                f"{ms:.2f} ms median ({nq / ms * 1000:,.0f} queries/s)",
            )
        )
    return out


# -------------------------------------------------------------------------------------------- main


def print_table(rows: list[Row]) -> None:
    header = ["check", "setting", "value", "target", ""]
    cells = [header, *(r.cells() for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    for k, line in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_cuda()
    import torch

    from cxr_embed.readers import read_dataset
    from cxr_embed.synth import generate

    started = time.perf_counter()
    rows = [
        Row("device", torch.cuda.get_device_name(0), f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    ]
    with tempfile.TemporaryDirectory() as tmp:
        source = args.data or Path(tmp) / "synth"
        if not (source / "synth.json").exists():
            log(f"writing {args.n:,} synthetic {args.size}² PNGs to {source}")
            t = time.perf_counter()
            generate(
                source, args.n, layout="chestxray14", seed=0, size=args.size, workers=os.cpu_count() or 1
            )
            rows.append(
                Row(
                    "synthetic set",
                    f"{args.n:,} PNGs {args.size}²",
                    f"written in {time.perf_counter() - t:.0f} s",
                )
            )
        if not args.skip_parity:
            log("parity")
            rows += parity([r.path for r in read_dataset(source)[:4]])
        if not args.skip_throughput:
            log("throughput")
            rows += throughput(source, args, started + args.budget)
    if not args.skip_search:
        log("faiss search")
        rows += search(args.rows)
    rows.append(Row("total", "", f"{time.perf_counter() - started:.0f} s", "<= 480 s"))
    print_table(rows)
    return 1 if any(r.ok is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
