"""`search eval` at ChestX-ray14 scale: retrieval quality of a 112,120 x 1024 store, exact and HNSW.

Synthetic clustered unit vectors stand in for embeddings (see ``search_latency.py``); each cluster
carries a finding pattern, so neighbours sharing findings are findable and the figures are not
trivial. Patients own ~3.7 images each (ChestX-ray14's ratio), so the patient exclusion and the
patient-clustered bootstrap do real work. Prints the build and evaluation time and the table.

    python benchmarks/search_eval.py                       # 112,120 x 1024, all findings, k 1,5,10
    python benchmarks/search_eval.py --n 20000 --dim 256   # a quick look
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_latency import clustered  # noqa: E402

from cxr_embed.records import FINDINGS  # noqa: E402
from cxr_embed.retrieval_eval import RetrievalEvalConfig, evaluate_store  # noqa: E402
from cxr_embed.store import Store, build_store_from_arrays  # noqa: E402


def build(path: Path, n: int, dim: int, clusters: int, seed: int) -> Store:
    rng = np.random.default_rng(seed)
    emb, _ = clustered(n, dim, clusters, rng)
    # each cluster has a finding pattern; an image keeps each of its cluster's findings with p=0.8
    pattern = rng.random((clusters, len(FINDINGS))) < 0.12
    assign = np.argmax(emb @ _centres(emb, clusters, rng).T, axis=1)
    findings = pattern[assign] & (rng.random((n, len(FINDINGS))) < 0.8)
    patients = np.minimum(np.arange(n) * 10 // 37, n)  # ~3.7 images per patient
    columns = {"image_id": [f"img{i:06d}" for i in range(n)], "path": [f"img{i:06d}.png" for i in range(n)],
               "patient_id": [f"p{p:06d}" for p in patients], "label": findings.any(axis=1).astype(int).tolist()}
    columns.update({name: findings[:, j].astype(int).tolist() for j, name in enumerate(FINDINGS)})
    import pyarrow as pa

    return build_store_from_arrays(path, emb, pa.table(columns), index_kind="hnsw", shard_size=16384)


def _centres(emb: np.ndarray, clusters: int, rng: np.random.Generator) -> np.ndarray:
    """Cluster centres estimated from a sample (the generator's own are not returned with noise)."""
    sample = emb[rng.choice(len(emb), size=min(len(emb), clusters * 20), replace=False)]
    return sample[:clusters]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=112_120)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--clusters", type=int, default=200)
    parser.add_argument("--ks", default="1,5,10")
    parser.add_argument("--label", default="all-findings")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = build(Path(tmp) / "store", args.n, args.dim, args.clusters, args.seed)
        t1 = time.perf_counter()
        config = RetrievalEvalConfig(ks=tuple(int(k) for k in args.ks.split(",")), label=args.label,
                                     n_boot=args.n_boot, seed=args.seed)
        report = evaluate_store(store, config)
        t2 = time.perf_counter()
    print(f"store {args.n:,} x {args.dim} (HNSW) built in {t1 - t0:.1f} s; search eval "
          f"({report.params['n_queries']:,} queries, {args.n_boot} patient-clustered bootstrap replicates) "
          f"in {t2 - t1:.1f} s")
    print(f"{'index':6} {'target':18} {'metric':9} {'k':>3} {'value':>7}  95% CI")
    for row in report.rows:
        if row.target in ("abnormal", FINDINGS[0], FINDINGS[1]):
            print(f"{row.index_kind:6} {row.target:18} {row.metric:9} {row.k:3d} {row.value:7.4f}  "
                  f"[{row.ci_low:.4f}, {row.ci_high:.4f}]")


if __name__ == "__main__":
    main()
