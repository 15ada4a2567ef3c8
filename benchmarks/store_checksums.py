"""Cost of checksum verification when reading a store's embeddings (issue 15.4).

Builds (once, kept in ``--dir``) a store of ``--rows`` x ``--dim`` random float32 embeddings in
4,096-row shards, then times (median of ``--repeat`` interleaved rounds, files in the page cache):

- plain read: every shard's embedding column with ``pq.read_table(path, columns=["embedding"])``
  into one (N, D) array (what a version-1 store did: no verification);
- verified read: ``Store.embeddings()`` with the verification cache cleared (each shard's bytes are
  read once, hashed with sha256, compared with store.json, then parsed from the same buffer);
- sha256 alone: hashing the shard files' bytes (already in memory), i.e. the added work;
- file bytes: reading the shard files into memory.

Target: verification adds < 10% to the read.

    .venv/bin/python benchmarks/store_checksums.py                      # 112,120 x 1024 (ChestX-ray14 size)
    .venv/bin/python benchmarks/store_checksums.py --rows 20000         # quick look
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from cxr_embed.store import Store, build_store_from_arrays, embedding_matrix
from cxr_embed.store import reader as store_reader


def _build(path: Path, rows: int, dim: int) -> Store:
    if (path / "store.json").exists():
        store = Store.open(path, check_index=False)
        if (len(store), store.dim) == (rows, dim):
            return store
        raise SystemExit(f"{path} holds another store ({len(store)} x {store.dim}); pass another --dir")
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((rows, dim), dtype=np.float32)
    meta = [{"image_id": f"{i:08d}.png", "patient_id": f"{i // 4:08d}", "label": i % 2} for i in range(rows)]
    return build_store_from_arrays(path, emb, meta, shard_size=4096)


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=112_120)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/cxr-embed-bench-checksums"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    start = time.perf_counter()
    store = _build(args.dir / f"store-{args.rows}x{args.dim}", args.rows, args.dim)
    build_s = time.perf_counter() - start
    paths = store.shard_paths

    def plain() -> np.ndarray:
        out = np.empty((len(store), store.dim), np.float32)
        for shard, path in zip(store.manifest["shards"], paths, strict=True):
            col = pq.read_table(path, columns=["embedding"]).column("embedding")
            out[shard["first_row_id"] : shard["first_row_id"] + shard["rows"]] = embedding_matrix(
                col, store.dim
            )
        return out

    def verified() -> np.ndarray:
        store_reader._VERIFIED.clear()
        return Store.open(store.path, check_index=False).embeddings()

    blobs = [p.read_bytes() for p in paths]
    timed = {
        "plain_read_s": plain,
        "verified_read_s": verified,
        "sha256_alone_s": lambda: [hashlib.sha256(b).hexdigest() for b in blobs],
        "file_bytes_s": lambda: [p.read_bytes() for p in paths],
    }
    samples: dict[str, list[float]] = {k: [] for k in timed}
    for _ in range(args.repeat):  # interleaved, so a burst of load on the machine hits every variant alike
        for name, fn in timed.items():
            samples[name].append(_best(fn, 1))
    results = {
        "rows": len(store),
        "dim": store.dim,
        "shards": len(paths),
        "store_mb": round(sum(len(b) for b in blobs) / 2**20, 1),
        "build_s": round(build_s, 1),
        **{k: float(np.median(v)) for k, v in samples.items()},
        "min_s": {k: round(min(v), 3) for k, v in samples.items()},
    }
    np.testing.assert_array_equal(plain(), verified())
    results["verification_overhead_pct"] = round(
        100 * (results["verified_read_s"] / results["plain_read_s"] - 1), 1
    )
    results["sha256_share_of_plain_read_pct"] = round(
        100 * results["sha256_alone_s"] / results["plain_read_s"], 1
    )
    for k in ("plain_read_s", "verified_read_s", "sha256_alone_s", "file_bytes_s"):
        results[k] = round(results[k], 3)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
