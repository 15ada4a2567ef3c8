"""FAISS indexes over a store's embeddings: build, grow, save, load, check.

Every index is wrapped in :class:`faiss.IndexIDMap2`, so its ids are the store's ``row_id`` and
``reconstruct(row_id)`` works whatever the inner structure: that is what lets ``store validate``
prove the index and the Parquet shards agree, and lets retrieval map hits back to rows without a
side table. Vectors are L2-normalised before they go in, so inner product == cosine similarity.

Kinds (``--index``):

- ``flat``: exact inner product (the default; exact search stays fast up to a few 100k rows);
- ``ivf``: IVF-Flat, ``nlist ≈ 4·√N`` lists, ``nprobe`` 1/8 of them (at least 4);
- ``hnsw``: HNSW graph (M=32), no training, good recall at low latency, larger in memory;
- ``ivfpq``: IVF with product quantisation, for stores that do not fit in memory as float32;
- ``auto``: ``flat`` below :data:`AUTO_FLAT_MAX_ROWS` rows, ``ivf`` above.

When faiss-gpu and a CUDA device are present, training and adding run on the GPU (the expensive
part of IVF on millions of rows); the saved index is always a CPU index so a store reads anywhere.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from cxr_embed.errors import ConfigError, StoreError

INDEX_KINDS: tuple[str, ...] = ("flat", "ivf", "hnsw", "ivfpq", "auto")
AUTO_FLAT_MAX_ROWS = 250_000
"""Above this many rows ``auto`` picks IVF: exact search costs O(N·D) per query (≈1 GFLOP at 250k×1024)."""
# Graph quality caps HNSW recall: at 1.12M clustered vectors efConstruction 80 plateaued at
# recall@10 0.966 whatever efSearch (benchmarks/search_latency.py), so build a denser graph.
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128
_TRAIN_POINTS_PER_LIST = 39  # FAISS warns below 39 training points per centroid
_REBUILD_GROWTH = 4.0  # retrain IVF centroids once the store is 4x what they were trained on
HNSW_M = 32
SMALL_INPUT_ROWS = 20_000


@dataclass
class IndexInfo:
    """What ``store.json`` records about the committed index (its ``index`` entry, beside the file name and sha256)."""

    kind: str
    ntotal: int
    dim: int
    metric: str = "inner_product"
    normalized: bool = True
    trained_on: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    faiss_version: str = faiss.__version__
    built_at: float = field(default_factory=time.time)


def resolve_kind(kind: str, n_rows: int) -> str:
    """Turn ``auto`` into a concrete kind for ``n_rows``; refuse unknown kinds.

    Trained kinds need data: with no rows at all there is nothing to train on, so they fall back
    to ``flat`` (an empty store still gets a valid, empty index).
    """
    if kind not in INDEX_KINDS:
        raise ConfigError(f"Unknown index kind {kind!r}: use one of {', '.join(INDEX_KINDS)}.")
    if kind == "auto":
        return "flat" if n_rows <= AUTO_FLAT_MAX_ROWS else "ivf"
    if kind in ("ivf", "ivfpq") and n_rows == 0:
        return "flat"
    return kind


def normalized(vectors: np.ndarray) -> np.ndarray:
    """A float32 C-contiguous, L2-normalised copy (zero vectors stay zero)."""
    out = np.array(vectors, dtype=np.float32, order="C", copy=True)
    if len(out):
        faiss.normalize_L2(out)
    return out


def _nlist(n: int) -> int:
    return max(1, min(int(4 * math.sqrt(n)), n // _TRAIN_POINTS_PER_LIST))


def _pq_params(dim: int, n: int) -> tuple[int, int]:
    """(m sub-quantisers, bits): m divides dim, ~16 dims per code; bits shrink for tiny training sets."""
    m = max(d for d in range(1, min(64, max(1, dim // 2)) + 1) if dim % d == 0)
    nbits = int(max(1, min(8, math.floor(math.log2(max(2, n // _TRAIN_POINTS_PER_LIST))))))
    return m, nbits


def _inner_index(kind: str, dim: int, n: int) -> tuple[faiss.Index, dict[str, Any]]:
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexFlatIP(dim), {}
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, ip)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
        return index, {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH}
    nlist = _nlist(n)
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, ip)
        params: dict[str, Any] = {"nlist": nlist}
    else:
        m, nbits = _pq_params(dim, n)
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, nbits, ip)
        params = {"nlist": nlist, "m": m, "nbits": nbits}
    index.nprobe = min(nlist, max(4, nlist // 8))
    params["nprobe"] = index.nprobe
    return index, params  # the SWIG wrapper keeps ``quantizer`` alive as long as ``index``


def gpu_available() -> bool:
    """True when this FAISS build has GPU support and sees at least one device."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _train(inner: faiss.Index, vectors: np.ndarray, use_gpu: bool) -> faiss.Index:
    """Train ``inner`` (IVF k-means) when it needs it; on the GPU when asked, where it matters most.

    Adding stays on the CPU: it is a copy (flat) or one assignment pass (IVF), cheap next to training.
    """
    if inner.is_trained:
        return inner
    if use_gpu:
        gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, inner)
        gpu.train(vectors)
        return faiss.index_gpu_to_cpu(gpu)
    inner.train(vectors)
    return inner


@contextmanager
def _threads_for(n: int) -> Iterator[None]:
    """One OpenMP thread for small inputs: FAISS's thread start-up then costs more than the work,
    and on a busy machine oversubscribed spinning threads made a 600-row IVF-PQ build 60x slower."""
    before = faiss.omp_get_max_threads()
    if n < SMALL_INPUT_ROWS:
        faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def build_index(vectors: np.ndarray, ids: np.ndarray, kind: str = "flat", *, use_gpu: bool | None = None) -> tuple[faiss.Index, IndexInfo]:
    """A fresh ``IndexIDMap2`` over normalised ``vectors`` with ``ids`` (the row_ids).

    ``kind`` may be ``auto``; ``use_gpu=None`` means "when available".
    """
    vectors = normalized(vectors)
    n, dim = vectors.shape
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if len(ids) != n:
        raise StoreError(f"build_index got {n} vectors but {len(ids)} ids.")
    concrete = resolve_kind(kind, n)
    inner, params = _inner_index(concrete, dim, n)
    gpu = gpu_available() if use_gpu is None else use_gpu
    with _threads_for(n):
        index = faiss.IndexIDMap2(_train(inner, vectors, gpu))
        _enable_reconstruct(index)
        if n:
            index.add_with_ids(vectors, ids)
    return index, IndexInfo(kind=concrete, ntotal=n, dim=dim, trained_on=n, params=params)


def needs_rebuild(info: IndexInfo, requested_kind: str, n_rows: int) -> bool:
    """Whether growing the saved index to ``n_rows`` should rebuild it rather than add to it.

    Rebuild when the kind asked for (after ``auto``) differs, or IVF centroids were trained on a
    much smaller store (stale centroids make lists unbalanced and recall drops).
    """
    if resolve_kind(requested_kind, n_rows) != info.kind:
        return True
    return info.kind in ("ivf", "ivfpq") and n_rows > _REBUILD_GROWTH * max(1, info.trained_on)


def add_to_index(index: faiss.Index, info: IndexInfo, vectors: np.ndarray, ids: np.ndarray) -> IndexInfo:
    """Append normalised ``vectors`` with ``ids`` to an existing IDMap2 index, in place."""
    vectors = normalized(vectors)
    if len(vectors):
        index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
    return IndexInfo(**{**asdict(info), "ntotal": int(index.ntotal), "built_at": time.time()})


def index_ids(index: faiss.Index) -> np.ndarray:
    """The ids an ``IndexIDMap``/``IndexIDMap2`` holds, in insertion order (int64)."""
    if not hasattr(index, "id_map"):
        raise StoreError("The FAISS index has no id map; it was not written by cxr-embed. Rebuild it with `cxr-embed index`.")
    return faiss.vector_to_array(index.id_map).astype(np.int64, copy=False)


def _enable_reconstruct(index: faiss.Index) -> None:
    """IVF indexes can only ``reconstruct`` with a direct map; make one (cheap: one int per vector)."""
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    if isinstance(inner, faiss.IndexIVF):
        inner.make_direct_map()


def read_index(path: Path) -> faiss.Index:
    """Read a saved index (CPU) ready for ``reconstruct``; StoreError when unreadable."""
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise StoreError(f"Cannot read {path} ({exc}). Delete it and rerun `cxr-embed index` to rebuild the index.") from exc
    _enable_reconstruct(index)
    return index


def index_from_bytes(data: bytes) -> faiss.Index:
    """Deserialise an index from the bytes of its file (already read and checksummed by the store).

    Raises StoreError when the bytes are not a FAISS index.
    """
    try:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as exc:
        raise StoreError(f"not a readable FAISS index ({str(exc).splitlines()[0][:120]})") from exc
    _enable_reconstruct(index)
    return index


def index_to_bytes(index: faiss.Index) -> bytes:
    """The bytes ``faiss.write_index`` would write (so the store can hash them before the write)."""
    return faiss.serialize_index(index).tobytes()


def to_gpu(index: faiss.Index) -> faiss.Index:
    """A GPU copy of ``index`` for searching, when faiss-gpu and a device are present; else ``index``.

    HNSW has no GPU implementation and stays on the CPU.
    """
    if not gpu_available():
        return index
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    if isinstance(inner, faiss.IndexHNSW):
        return index
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)


def reconstruct_rows(index: faiss.Index, row_ids: np.ndarray) -> np.ndarray:
    """The vectors the index holds for ``row_ids`` (via the IDMap2 reverse map)."""
    if not len(row_ids):
        return np.zeros((0, index.d), dtype=np.float32)
    return index.reconstruct_batch(np.ascontiguousarray(row_ids, dtype=np.int64))
