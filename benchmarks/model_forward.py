"""Image-tower forward time of MedImageInsight (random weights), seconds per image.

Measures ``image_encoder.forward_features`` on 480x480 inputs, eval mode, no grad, for each batch
size and precision (fp32, and bf16/fp16 autocast). The full-size tower (360.6 M parameters,
625 GFLOPs per image) costs about 4-5 s per image in fp32 on a 2-core CPU, so keep ``--repeats``
small there; on a GPU the defaults are fine.

    python benchmarks/model_forward.py --arch full --batch-sizes 1,8 --precisions fp32,bf16 --repeats 3
    python benchmarks/model_forward.py --arch tiny --repeats 2      # seconds, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from cxr_embed.model import tiny_model_dir
from cxr_embed.model.config import full_config, load_config
from cxr_embed.model.davit import DaViT
from cxr_embed.model.medimageinsight import PRECISIONS, resolve_device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", choices=("full", "tiny"), default="full", help="architecture (default: full)")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default: 1,8)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16 (GPU only)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per setting first")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    return p.parse_args(argv)


def time_forward(tower: DaViT, batch: torch.Tensor, dtype: torch.dtype | None, repeats: int, warmup: int) -> list[float]:
    device = batch.device
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    times = []
    with torch.no_grad(), autocast:
        for i in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            tower.forward_features(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = full_config() if args.arch == "full" else load_config(tiny_model_dir() / "config.yaml")
    torch.manual_seed(0)
    with torch.device(device):
        tower = DaViT(cfg.image).eval()
    n_params = sum(p.numel() for p in tower.parameters())
    size = cfg.image.image_size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    rows = []
    for precision in args.precisions.split(","):
        if precision == "fp16" and device.type != "cuda":
            print("skipping fp16: autocast fp16 needs a GPU", file=sys.stderr)
            continue
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            batch = torch.randn(bs, 3, size, size, device=device)
            times = time_forward(tower, batch, PRECISIONS[precision], args.repeats, args.warmup)
            med = statistics.median(times)
            rows.append({"arch": args.arch, "device": name, "precision": precision, "batch": bs,
                         "s_per_batch": round(med, 4), "s_per_image": round(med / bs, 4),
                         "images_per_s": round(bs / med, 2), "repeats": len(times)})
            if not args.json:
                print(f"{args.arch:5} {precision:5} batch {bs:3}: {med / bs:8.4f} s/image  "
                      f"({bs / med:8.2f} images/s, median of {len(times)})", flush=True)
    if args.json:
        print(json.dumps({"params": n_params, "torch": torch.__version__, "rows": rows}, indent=2))
    else:
        print(f"image tower: {n_params:,} parameters, input {size}x{size}, device {name}, torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
