"""Similar-case search latency, throughput and recall@k: cxr-embed's index kinds vs numpy and sklearn.

Synthetic, clustered, unit-norm vectors stand in for MedImageInsight embeddings (real embeddings
cluster by anatomy and view, which is what makes approximate indexes work). Queries are fresh
points from the same clusters, not stored rows. For each size this prints, per method:
single-query p50/p99 latency (one query at a time, as `cxr-embed search` runs), batched throughput
(all queries in one call) and recall@k against exact search.

Methods: numpy matrix-vector product alone (the memory-bandwidth floor of any exact search),
numpy brute force (matvec + argpartition), sklearn NearestNeighbors (brute), and cxr-embed's FAISS
index kinds as built by ``cxr_embed.indexes.build_index``: ``flat`` (the default, exact), ``hnsw``
(efSearch sweep) and ``ivf`` (nprobe sweep).

    python benchmarks/search_latency.py                                   # 112,120 and 1,121,200 x 1024
    python benchmarks/search_latency.py --sizes 20000 --dim 256 --queries 50   # a quick look
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

SPREAD = 0.6
"""Noise norm relative to the unit cluster centre: cos(point, centre) ≈ 0.86, within-cluster ≈ 0.74."""


def clustered(n: int, dim: int, n_clusters: int, rng: np.random.Generator, centers: np.ndarray | None = None,
              chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors around ``n_clusters`` random centres (float32, generated in chunks)."""
    if centers is None:
        centers = rng.standard_normal((n_clusters, dim), dtype=np.float32)
        centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        assign = rng.integers(0, len(centers), stop - start)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32)
        block = centers[assign] + (SPREAD / np.sqrt(dim)) * noise
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out, centers


def exact_topk(x: np.ndarray, queries: np.ndarray, k: int, chunk: int = 64) -> np.ndarray:
    """Ground-truth top-k row indices by inner product."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), chunk):
        sims = queries[s : s + chunk] @ x.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1)
        out[s : s + chunk] = np.take_along_axis(part, order, axis=1)
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth, strict=True)]))


def measure(name: str, single: Callable[[np.ndarray], np.ndarray], batch: Callable[[np.ndarray], np.ndarray] | None,
            queries: np.ndarray, truth: np.ndarray | None, floor: Callable[[np.ndarray], object] | None = None) -> dict:
    """Time ``single`` per query (after one warm-up) and ``batch`` once over all queries.

    With ``floor`` (the numpy matrix-vector product), each query also times the floor right after,
    so the ratio of the two p50s holds on a machine shared with other jobs.
    """
    single(queries[:1])
    times, floor_times, found = [], [], []
    for q in queries:
        t = time.perf_counter()
        ids = single(q[None, :])
        times.append(time.perf_counter() - t)
        found.append(np.asarray(ids).reshape(-1))
        if floor is not None:
            t = time.perf_counter()
            floor(q[None, :])
            floor_times.append(time.perf_counter() - t)
    row = {"method": name, "p50_ms": 1e3 * np.percentile(times, 50), "p99_ms": 1e3 * np.percentile(times, 99)}
    if batch is not None:
        t = time.perf_counter()
        found_for_recall = np.asarray(batch(queries))
        row["qps_batch"] = len(queries) / (time.perf_counter() - t)
    else:
        row["qps_batch"] = float("nan")
        found_for_recall = np.stack(found) if found[0].size else None
    row["recall"] = recall(found_for_recall, truth) if truth is not None and found_for_recall is not None else float("nan")
    ratio = f"  {np.median(times) / np.median(floor_times):.2f}x matvec" if floor_times else ""
    print(f"  {name:<28} p50 {row['p50_ms']:8.3f} ms  p99 {row['p99_ms']:8.3f} ms  "
          f"batch {row['qps_batch']:9.1f} q/s  recall@k {row['recall']:.4f}{ratio}", flush=True)
    return row


def numpy_topk(x: np.ndarray, k: int) -> Callable[[np.ndarray], np.ndarray]:
    def run(q: np.ndarray) -> np.ndarray:
        return exact_topk(x, q, k)
    return run


def faiss_search(index, k: int) -> Callable[[np.ndarray], np.ndarray]:
    """The call cxr-embed's retrieval makes for approximate indexes."""
    from cxr_embed.retrieval import index_search

    def run(q: np.ndarray) -> np.ndarray:
        return index_search(index, q, k)[1]
    return run


def plain_search(index, k: int) -> Callable[[np.ndarray], np.ndarray]:
    """``index.search`` with FAISS's defaults, for comparison."""
    def run(q: np.ndarray) -> np.ndarray:
        return index.search(q, k)[1]
    return run


def ranker_search(index, k: int) -> Callable[[np.ndarray], np.ndarray]:
    """cxr-embed's unfiltered ranking (``retrieval.Ranker``: exact numpy over the flat index's vectors)."""
    from cxr_embed.retrieval import Ranker

    ranker = Ranker(index)

    def run(q: np.ndarray) -> np.ndarray:
        return np.stack([ids for ids, _, _ in ranker.rank(q, None, k)])
    return run


def bench_size(n: int, args: argparse.Namespace) -> None:
    import faiss
    from sklearn.neighbors import NearestNeighbors

    from cxr_embed.indexes import build_index

    rng = np.random.default_rng(args.seed)
    n_clusters = max(8, int(np.sqrt(n)))
    t = time.perf_counter()
    x, centers = clustered(n, args.dim, n_clusters, rng)
    queries, _ = clustered(args.queries, args.dim, n_clusters, rng, centers=centers)
    print(f"\n== {n:,} x {args.dim} ({n_clusters} clusters, {x.nbytes / 2**30:.2f} GiB), {args.queries} queries, "
          f"k={args.k}, {faiss.omp_get_max_threads()} threads  [data {time.perf_counter() - t:.1f}s]", flush=True)
    truth = exact_topk(x, queries, args.k)

    floor = lambda q: x @ q[0]  # noqa: E731
    measure("numpy matvec (floor)", floor, None, queries, None)
    measure("numpy brute force", numpy_topk(x, args.k), numpy_topk(x, args.k), queries, truth, floor)
    nn = NearestNeighbors(n_neighbors=args.k, algorithm="brute", metric="euclidean").fit(x)
    measure("sklearn NearestNeighbors", lambda q: nn.kneighbors(q, return_distance=False),
            lambda q: nn.kneighbors(q, return_distance=False), queries, truth, floor)
    ids = np.arange(n, dtype=np.int64)
    for kind in args.kinds:
        t = time.perf_counter()
        index, info = build_index(x, ids, kind, use_gpu=False)
        print(f"  [{kind} built in {time.perf_counter() - t:.1f}s: {info.params}]", flush=True)
        inner = faiss.downcast_index(index.index)
        if kind == "hnsw":
            for ef in args.ef:
                inner.hnsw.efSearch = ef
                measure(f"hnsw efSearch={ef}", faiss_search(index, args.k), faiss_search(index, args.k), queries, truth)
        elif kind == "ivf":
            for nprobe in [p for p in args.nprobe if p <= inner.nlist]:
                inner.nprobe = nprobe
                measure(f"ivf nlist={inner.nlist} nprobe={nprobe}", faiss_search(index, args.k),
                        faiss_search(index, args.k), queries, truth)
        elif kind == "flat":
            measure("flat (cxr-embed default)", ranker_search(index, args.k), ranker_search(index, args.k), queries,
                    truth, floor)
            measure("flat, plain faiss search", plain_search(index, args.k), plain_search(index, args.k), queries,
                    truth, floor)
        else:
            measure(kind, faiss_search(index, args.k), faiss_search(index, args.k), queries, truth)
        del index, inner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="112120,1121200", help="comma-separated store sizes (rows)")
    parser.add_argument("--dim", type=int, default=1024, help="embedding dimension")
    parser.add_argument("--queries", type=int, default=200, help="number of query vectors")
    parser.add_argument("-k", type=int, default=10, help="neighbours per query (recall@k)")
    parser.add_argument("--kinds", default="flat,hnsw,ivf", help="cxr-embed index kinds to build")
    parser.add_argument("--ef", default="16,32,64,128,256", help="HNSW efSearch sweep")
    parser.add_argument("--nprobe", default="1,4,8,16,32,64,128", help="IVF nprobe sweep")
    parser.add_argument("--threads", type=int, default=0, help="FAISS/OpenMP threads (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.kinds = [k for k in args.kinds.split(",") if k]
    args.ef = [int(v) for v in args.ef.split(",")]
    args.nprobe = [int(v) for v in args.nprobe.split(",")]
    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    for n in (int(s) for s in args.sizes.split(",")):
        bench_size(n, args)


if __name__ == "__main__":
    main()
