"""Training throughput of the image tower (+ linear head) as `cxr-embed finetune` runs it.

For each precision x gradient-checkpointing setting, one fresh subprocess (so peak memory is that
setting's own) builds the DaViT tower with random weights (full size by default, no download), then
times optimizer steps of ``--micro-batch`` images x ``--accumulate`` micro-batches at 480x480 with
the same step code as fine-tuning: AdamW with the no-decay groups, autocast, clipping, BCE head.

Prints images/s (after ``--warmup`` untimed steps) and peak memory: CUDA max allocated on a GPU,
the process's peak RSS on CPU.

    # GPU: the study's batch of 48
    python benchmarks/finetune_throughput.py --micro-batch 48 --accumulate 1 --steps 5
    # CPU (the full tower costs ~5 s per image forward): one step of 2 images, no warm-up
    python benchmarks/finetune_throughput.py --device cpu --micro-batch 1 --accumulate 2 --steps 1 --warmup 0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _one(args: argparse.Namespace) -> dict:
    import resource

    import torch
    import torch.nn.functional as F

    from cxr_embed.finetune import FineTuneNet, param_groups
    from cxr_embed.model.config import full_config, load_config
    from cxr_embed.model.davit import DaViT
    from cxr_embed.model.files import CONFIG_NAME, tiny_model_dir
    from cxr_embed.precision import autocast

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cfg = full_config() if args.arch == "full" else load_config(tiny_model_dir() / CONFIG_NAME)
    torch.manual_seed(0)
    encoder = DaViT(cfg.image)
    encoder.set_grad_checkpointing(args.checkpointing == "on")
    net = FineTuneNet(encoder, encoder.num_features, 1).to(device).train()
    opt = torch.optim.AdamW(param_groups(list(net.named_parameters()), 0.2), lr=1e-5)
    size = cfg.image.image_size
    x = torch.randn(args.micro_batch, 3, size, size, device=device)
    y = torch.randint(0, 2, (args.micro_batch, 1), device=device).float()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for _ in range(args.accumulate):
            with autocast(device.type, args.precision):
                logits = net(x)
            (F.binary_cross_entropy_with_logits(logits.float(), y) / args.accumulate).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB -> GiB on Linux
    seconds = time.perf_counter() - start
    images = args.steps * args.micro_batch * args.accumulate
    return {"device": str(device), "arch": args.arch, "precision": args.precision, "checkpointing": args.checkpointing,
            "batch": args.micro_batch * args.accumulate, "micro_batch": args.micro_batch, "steps": args.steps,
            "images_per_s": images / seconds, "s_per_image": seconds / images, "peak_gib": peak,
            "params_m": sum(p.numel() for p in net.parameters()) / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=("full", "tiny"), default="full", help="full-size tower or the tiny fixture's")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16, fp16 (fp16: GPU only)")
    p.add_argument("--checkpointing", default="off,on", help="comma list of off, on")
    p.add_argument("--micro-batch", type=int, default=48, help="images per forward/backward")
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--precision", help=argparse.SUPPRESS)
    p.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(_one(args)), flush=True)
        return
    rows = []
    for precision in args.precisions.split(","):
        for ckpt in args.checkpointing.split(","):
            cmd = [sys.executable, __file__, "--single", "--precision", precision, "--checkpointing", ckpt,
                   "--arch", args.arch, "--device", args.device, "--micro-batch", str(args.micro_batch),
                   "--accumulate", str(args.accumulate), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{precision} checkpointing={ckpt}: failed: {tail}", file=sys.stderr)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{row['device']:5} {row['arch']:4} {precision:5} ckpt={ckpt:3} batch {row['batch']:3} "
                  f"(micro {row['micro_batch']}): {row['images_per_s']:8.3f} images/s "
                  f"({row['s_per_image']:.2f} s/image), peak {row['peak_gib']:.2f} GiB", flush=True)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
