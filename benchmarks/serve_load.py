"""Bounded load test of ``cxr-embed serve`` on loopback: throughput, latency, errors, memory, batching.

A real server process (the packaged tiny model on CPU) answers ``POST /v1/triage`` with PNG chest
X-rays from ``cxr-embed synth``, over a store of real tiny-model embeddings of other synthetic
images. Closed-loop clients (``--concurrency`` levels, ``--requests`` each) keep exactly C
requests in flight. Reported per level: requests/s, p50/p99 latency, errors (anything but 200 or
an answer without neighbours), and the server's RSS after warm-up and at the end. Then the top
concurrency against a second server started with ``--max-batch 1`` (one image per forward), in
alternating rounds so that a machine whose load drifts affects both alike, gives the micro-batching
speed-up.

    python benchmarks/serve_load.py                          # 2000 requests at 1, 8, 32
    python benchmarks/serve_load.py --requests 300 --store-images 64   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serve_helpers import start_server  # noqa: E402  (shared with the tests: the server process runner)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_store(root: Path, n_images: int) -> Path:
    """Index ``n_images`` synthetic X-rays with the tiny model (the real index job)."""
    from cxr_embed.job import IndexConfig, run_index
    from cxr_embed.model import MedImageInsight, tiny_model_dir
    from cxr_embed.synth import generate

    images = root / "images"
    generate(images, n_images, layout="chestxray14", seed=1, size=256)
    store = root / "store"
    model = MedImageInsight.load(tiny_model_dir(), device="cpu")
    run_index(images, store, IndexConfig(device="cpu", batch_size=16, workers=1), progress=False, model=model)
    return store


def query_images(root: Path, n: int) -> list[bytes]:
    from cxr_embed.synth import generate

    generate(root / "queries", n, layout="chestxray14", seed=99, size=256)
    return [p.read_bytes() for p in sorted((root / "queries").rglob("*.png"))]


async def load(url: str, bodies: list[bytes], requests: int, concurrency: int) -> dict:
    import httpx

    latencies: list[float] = []
    errors = 0
    counter = iter(range(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in counter:
            start = time.perf_counter()
            try:
                res = await client.post(
                    "/v1/triage", content=bodies[i % len(bodies)], headers={"Content-Type": "image/png"}
                )
                ok = res.status_code == 200 and bool(res.json()["results"][0]["neighbors"])
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - start)
            errors += not ok

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
        wall = time.perf_counter() - start
    lat = np.asarray(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": requests,
        "seconds": round(wall, 2),
        "req_per_s": round(requests / wall, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "errors": errors,
    }


def batch_totals(url: str) -> tuple[float, float]:
    """(images, forwards) so far, from the server's own Prometheus batch-size histogram."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    samples = {s.name: s.value for s in fams["cxr_serve_batch_size"].samples if not s.labels.get("le")}
    return samples["cxr_serve_batch_size_sum"], samples["cxr_serve_batch_size_count"]


def serve(store: Path, root: Path, max_batch: int, tag: str):
    from cxr_embed.model import tiny_model_dir

    args = ["--store", str(store), "--model-dir", str(tiny_model_dir()), "--device", "cpu",
            "--max-batch", str(max_batch), "--log-level", "warning"]  # fmt: skip
    return start_server(args, root / f"server-{tag}.log")


def measure(server, bodies: list[bytes], requests: int, concurrency: int, max_batch: int) -> dict:
    images, forwards = batch_totals(server.url)
    row = asyncio.run(load(server.url, bodies, requests, concurrency))
    images2, forwards2 = batch_totals(server.url)
    row["mean_batch"] = round((images2 - images) / max(1.0, forwards2 - forwards), 2)
    row["max_batch"] = max_batch
    print(json.dumps(row), flush=True)
    return row


def pooled(rows: list[dict]) -> dict:
    """Rounds of one configuration pooled: total requests over total seconds."""
    n, secs = sum(r["requests"] for r in rows), sum(r["seconds"] for r in rows)
    return {"requests": n, "seconds": round(secs, 2), "req_per_s": round(n / secs, 2),
            "errors": sum(r["errors"] for r in rows), "mean_batch": rows[0]["mean_batch"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000, help="Requests per concurrency level.")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--store-images", type=int, default=200, help="Synthetic images indexed into the store.")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--out", type=Path, help="Write the results as JSON here.")
    ap.add_argument("--rounds", type=int, default=3, help="Alternating batched / one-at-a-time rounds at the top "
                    "concurrency (so a machine whose load drifts affects both alike).")  # fmt: skip
    args = ap.parse_args()
    top = max(args.concurrency)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        store = build_store(root, args.store_images)
        bodies = query_images(root, 16)
        print(
            f"store of {args.store_images} images built in {time.perf_counter() - t0:.1f} s", file=sys.stderr
        )
        batched, single = serve(store, root, args.max_batch, "batched"), serve(store, root, 1, "single")
        try:
            for server in (batched, single):  # warm-up: allocator, caches, first forwards
                asyncio.run(load(server.url, bodies, min(64, args.requests), top))
            before = {
                name: rss_mb(srv.pid()) for name, srv in (("batched", batched), ("one_at_a_time", single))
            }
            levels = [measure(batched, bodies, args.requests, c, args.max_batch) for c in args.concurrency]
            ab: dict[str, list[dict]] = {"batched": [], "single": []}
            per_round = max(1, args.requests // args.rounds)
            for _ in range(args.rounds):
                ab["batched"].append(measure(batched, bodies, per_round, top, args.max_batch))
                ab["single"].append(measure(single, bodies, per_round, top, 1))
            after = {
                name: rss_mb(srv.pid()) for name, srv in (("batched", batched), ("one_at_a_time", single))
            }
        finally:
            batched.stop()
            single.stop()
    a, b = pooled(ab["batched"]), pooled(ab["single"])
    result = {
        "levels": levels,
        "memory_mb": {name: {"after_warmup": round(before[name], 1), "end": round(after[name], 1),
                             "growth_pct": round(100 * (after[name] - before[name]) / before[name], 1)}
                      for name in before},
        "ab_at_top_concurrency": {"concurrency": top, "batched": a, "one_at_a_time": b,
                                  "batching_speedup": round(a["req_per_s"] / b["req_per_s"], 2)},
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
