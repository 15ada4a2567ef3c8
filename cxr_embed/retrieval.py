"""Similar-case lookup over a store: by vector, stored image id, new image, or free text.

Filters apply BEFORE ranking, so exactly ``k`` neighbours come back whenever at least ``k`` rows pass
them (post-filtering a top-k list silently returns fewer). The allowed rows are a boolean mask over
``row_id`` built from the ``where`` predicate (evaluated by DuckDB on the ``images`` view) and, per
query, the excluded patient. :class:`Ranker` applies it by selectivity:

* at most ``EXACT_SUBSET_MAX_FRACTION`` (5%) of the rows allowed: exact inner products on just those
  rows (``strategy="exact-subset"``), cheaper than a full scan and never under-filled;
* flat index (the default kind): exact numpy search over the index's vectors, disallowed rows
  scored -inf (``"exact"``). One BLAS matrix-vector product per query is the memory-bandwidth floor;
  FAISS's single-query loop measured 2-3x slower (``benchmarks/search_latency.py``);
* approximate index (HNSW, IVF): plain FAISS search without a mask (``"index"``); with one, an
  ``IDSelectorBitmap`` passed through ``SearchParameters`` (``"index+selector"``): a bitmap because
  row_ids are dense 0..N-1, so membership is one bit test. Graphs and IVF lists can still under-fill
  under a filter; a query that got fewer than ``min(k, allowed)`` hits is redone exactly on the
  subset (``"exact-subset"``).

A query that is itself a stored image (``search_by_ids``, or ``search_by_images`` on a stored
file) never gets that image back, and so never counts its own label in the vote: ranking asks for
one extra neighbour and drops the query's row. Its patient's other images stay unless
``exclude_same_patient`` removes them too.

Similarity is the inner product of unit-norm embeddings (= cosine); query vectors are normalised
here. The probability of abnormal is a kNN vote over the neighbours with a known label:
``vote="weighted"`` (default) weights each by ``max(similarity, 0)`` so near-duplicates count more
than barely-similar cases; ``vote="plain"`` is the fraction of abnormal neighbours.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from cxr_embed.errors import ConfigError, QueryError
from cxr_embed.records import FINDINGS
from cxr_embed.sql import check_read_only, connect_readonly

if TYPE_CHECKING:
    import duckdb
    import faiss

    from cxr_embed.model import MedImageInsight
    from cxr_embed.store import Store

EXACT_SUBSET_MAX_FRACTION = 0.05
FLAT_COPY_MAX_BYTES = 2 * 2**30
"""Flat indexes up to this size are searched from a huge-page-backed copy (see :class:`Ranker`)."""
Vote = Literal["weighted", "plain"]
_META_COLUMNS = ("row_id", "image_id", "path", "patient_id", "label", "split", "sex", "age", "view", *FINDINGS)


@dataclass(frozen=True)
class Neighbor:
    """One similar case. ``findings`` names the positive findings (None when unknown)."""

    rank: int
    row_id: int
    image_id: str
    path: str
    patient_id: str | None
    similarity: float
    label: int | None
    findings: tuple[str, ...] | None
    split: str | None
    sex: str | None
    age: float | None
    view: str | None


@dataclass(frozen=True)
class SearchResult:
    """The neighbours of one query, best first, with the kNN-vote probability of abnormal.

    Iterating, indexing or ``len()`` act on ``neighbors``, so a ``list[SearchResult]`` also reads as
    the ``list[list[Neighbor]]`` of the architecture contract.
    """

    neighbors: list[Neighbor]
    probability_abnormal: float | None  # None when no neighbour has a label
    strategy: str  # "exact" | "exact-subset" | "index" | "index+selector" (module docstring)
    candidates: int  # rows that passed the filters for this query
    query: str = ""
    excluded_patient: str | None = None
    excluded_row: int | None = None  # the query's own row, when it is a stored image

    def __iter__(self) -> Iterator[Neighbor]:
        return iter(self.neighbors)

    def __len__(self) -> int:
        return len(self.neighbors)

    def __getitem__(self, i: int) -> Neighbor:
        return self.neighbors[i]

    def with_files(self, links: dict[str, Path]) -> SearchResult:
        """The same result with each neighbour's stored reference replaced by its file.

        De-identified (DICOM) stores keep keyed references in ``path``; only the data owner's link
        file (``--link-file``, see :func:`cxr_embed.listing.read_link_file`) maps them back, so the
        mapping happens here, at display time, and never reaches the store.
        """
        return replace(self, neighbors=[replace(n, path=str(links.get(n.path, n.path))) for n in self.neighbors])


def knn_vote(similarities: Sequence[float], labels: Sequence[int | None], vote: Vote = "weighted") -> float | None:
    """Probability of abnormal from neighbour labels (see the module docstring for the weighting)."""
    pairs = [(s, y) for s, y in zip(similarities, labels, strict=True) if y is not None]
    if not pairs:
        return None
    sims = np.array([s for s, _ in pairs], dtype=np.float64)
    ys = np.array([y for _, y in pairs], dtype=np.float64)
    weights = np.clip(sims, 0.0, None) if vote == "weighted" else np.ones_like(sims)
    if weights.sum() <= 0:  # every labelled neighbour is dissimilar: fall back to a plain vote
        weights = np.ones_like(sims)
    return float((weights * ys).sum() / weights.sum())


def allowed_mask(store: Store, where: str | None) -> np.ndarray | None:
    """Boolean mask over row_id of the rows matching ``where`` (SQL on ``images``); None = all rows."""
    con = connect_readonly(store)
    try:
        return _where_mask(con, len(store), where)
    finally:
        con.close()


def _where_mask(con: duckdb.DuckDBPyConnection, n: int, where: str | None) -> np.ndarray | None:
    if where is None or not where.strip():
        return None
    import duckdb

    sql = f"SELECT row_id FROM images WHERE ({where})"
    hint = "It must be a SQL condition on the images view, e.g. \"view = 'PA' AND age > 60\"."
    try:
        check_read_only(sql)
        rows = con.sql(sql).fetchnumpy()["row_id"]
    except (QueryError, duckdb.Error) as exc:
        raise QueryError(f"Invalid --where predicate {where!r}: {exc}\n{hint}") from None
    mask = np.zeros(n, dtype=bool)
    mask[np.asarray(rows, dtype=np.int64)] = True
    return mask


def _without_patient(con: duckdb.DuckDBPyConnection, base: np.ndarray | None, n: int, patient: str) -> np.ndarray:
    rows = con.sql("SELECT row_id FROM images WHERE patient_id = $p", params={"p": patient}).fetchnumpy()["row_id"]
    mask = np.ones(n, dtype=bool) if base is None else base.copy()
    mask[np.asarray(rows, dtype=np.int64)] = False
    return mask


def search(
    store: Store,
    query_vectors: np.ndarray,
    k: int = 10,
    where: str | None = None,
    exclude_patients: Sequence[str | None] | None = None,
    *,
    vote: Vote = "weighted",
    queries: Sequence[str] | None = None,
    exclude_rows: Sequence[int | None] | None = None,
) -> list[SearchResult]:
    """k nearest stored images for each row of ``query_vectors`` (Q, D).

    ``exclude_patients[i]`` (one entry per query, None = nothing) removes that patient's images
    from query i's candidates; ``exclude_rows[i]`` is query i's own row_id when it is a stored
    image (never returned, never voting); ``queries`` are labels carried into the results.
    """
    if k < 1:
        raise ConfigError(f"k must be at least 1 (got {k}).")
    vectors = np.atleast_2d(np.asarray(query_vectors, dtype=np.float32))
    if vectors.shape[1] != store.dim:
        raise QueryError(f"Query vectors have {vectors.shape[1]} dims but the store holds {store.dim}-dim embeddings.")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = np.ascontiguousarray(vectors / np.where(norms > 0, norms, 1.0))
    n, n_queries = len(store), len(vectors)
    excluded = list(exclude_patients) if exclude_patients is not None else [None] * n_queries
    own = list(exclude_rows) if exclude_rows is not None else [None] * n_queries
    if len(excluded) != n_queries or len(own) != n_queries:
        raise ConfigError(f"exclude_patients and exclude_rows need one entry per query ({n_queries}).")
    extra = int(any(r is not None for r in own))  # one more, so k remain once the query's row is dropped

    ranker = ranker_for(store)
    con = connect_readonly(store)
    try:
        base = _where_mask(con, n, where)
        masks = [base if p is None else _without_patient(con, base, n, p) for p in excluded]
        if all(m is base for m in masks):  # one shared mask: rank all queries in one batch
            ranked = ranker.rank(vectors, base, k + extra)
        else:
            ranked = [ranker.rank(vectors[i : i + 1], masks[i], k + extra)[0] for i in range(n_queries)]
        ranked = [_without_row(r, own[i], k) for i, r in enumerate(ranked)]
        rows = _rows_by_id(con, np.unique(np.concatenate([ids for ids, _, _ in ranked] or [np.empty(0, np.int64)])))
    finally:
        con.close()

    results: list[SearchResult] = []
    for i, (ids, sims, strategy) in enumerate(ranked):
        neighbors = [_neighbor(rank, rows[int(r)], float(s)) for rank, (r, s) in enumerate(zip(ids, sims, strict=True), 1)]
        results.append(
            SearchResult(
                neighbors=neighbors,
                probability_abnormal=knn_vote([nb.similarity for nb in neighbors], [nb.label for nb in neighbors], vote),
                strategy=strategy,
                candidates=_candidates(masks[i], n, own[i]),
                query=queries[i] if queries is not None else "",
                excluded_patient=excluded[i],
                excluded_row=own[i],
            )
        )
    return results


def _without_row(ranked: Ranked, row: int | None, k: int) -> Ranked:
    """The top ``k`` of ``ranked`` without ``row`` (the query itself); if it was not there, the top k."""
    ids, sims, strategy = ranked
    if row is not None:
        keep = ids != row
        ids, sims = ids[keep], sims[keep]
    return ids[:k], sims[:k], strategy


def _candidates(mask: np.ndarray | None, n: int, own_row: int | None) -> int:
    """Rows a query could return: those passing its filters, less its own row."""
    allowed = n if mask is None else int(mask.sum())
    return allowed - int(own_row is not None and (mask is None or bool(mask[own_row])))


@contextmanager
def _threads_for(n_queries: int) -> Iterator[None]:
    """FAISS's IVF/HNSW search parallelises over queries, so extra OpenMP threads only add barrier
    waits (on a busy 2-core box one query took 30 ms with 2 threads, 1 ms with 1)."""
    import faiss

    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, min(previous, n_queries)))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def index_search(
    index: faiss.Index, vectors: np.ndarray, k: int, params: faiss.SearchParameters | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` with no more OpenMP threads than queries: (distances, ids), each (Q, k)."""
    with _threads_for(len(vectors)):
        if params is None:
            return index.search(vectors, k)
        return index.search(vectors, k, params=params)


Ranked = tuple[np.ndarray, np.ndarray, str]  # row_ids, similarities (best first), strategy


class Ranker:
    """Top-k row_ids over one store index (an ``IndexIDMap2`` whose ids are its positions, as
    ``Store.open`` guarantees), applying the selectivity rule of the module docstring.

    A flat index is searched exactly with numpy over its vectors: one BLAS matrix-vector product per
    query, the memory-bandwidth floor, where FAISS's per-query loop measured 2-3x slower. Up to
    ``FLAT_COPY_MAX_BYTES`` the vectors are copied once into a numpy array (huge pages); larger
    indexes are read in place (zero copy) rather than doubling memory. Approximate indexes go
    through FAISS.
    """

    def __init__(self, index: faiss.Index):
        import faiss

        self.index = index
        self.n = int(index.ntotal)
        self._inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
        self._buffer = _flat_buffer(self._inner, self.n)
        self.exact = isinstance(self._inner, faiss.IndexFlat) and self._inner.metric_type == faiss.METRIC_INNER_PRODUCT
        if self.exact and self._buffer.nbytes <= FLAT_COPY_MAX_BYTES:
            # numpy backs large arrays with transparent huge pages, FAISS's vector does not: the same
            # matrix-vector product ran ~15% faster on the copy (28 vs 32 ms at 112k x 1024)
            self._buffer = np.array(self._buffer)

    def rank(self, vectors: np.ndarray, mask: np.ndarray | None, k: int) -> list[Ranked]:
        """(row_ids, similarities, strategy) per query, best first, ``min(k, allowed rows)`` each."""
        allowed = self.n if mask is None else int(mask.sum())
        if mask is not None and allowed <= EXACT_SUBSET_MAX_FRACTION * self.n:
            rows = np.flatnonzero(mask)
            return self._exact(vectors, self._vectors_of(rows), rows, k, "exact-subset")
        if self.exact:
            return self._exact(vectors, self._buffer, None, k, "exact", mask)
        if mask is None:
            sims, ids = index_search(self.index, vectors, min(k, self.n))
            return [self._valid(ids[i], sims[i], "index") for i in range(len(vectors))]
        sims, ids = index_search(self.index, vectors, min(k, allowed), self.selector_params(mask))
        out = []
        rows = None
        for i in range(len(vectors)):
            ranked = self._valid(ids[i], sims[i], "index+selector")
            if len(ranked[0]) < min(k, allowed):  # graph/IVF under-filled: redo this query exactly
                rows = np.flatnonzero(mask) if rows is None else rows
                ranked = self._exact(vectors[i : i + 1], self._vectors_of(rows), rows, k, "exact-subset")[0]
            out.append(ranked)
        return out

    def _vectors_of(self, rows: np.ndarray) -> np.ndarray:
        """Stored (normalised) vectors of ``rows``: from the flat buffer, else reconstructed by id
        (exact for IVF-Flat; an ``ivfpq`` index only holds PQ approximations)."""
        if self._buffer is not None:
            return self._buffer[rows]
        from cxr_embed.indexes import reconstruct_rows

        return reconstruct_rows(self.index, rows)

    @staticmethod
    def _exact(
        queries: np.ndarray, matrix: np.ndarray, rows: np.ndarray | None, k: int, strategy: str,
        mask: np.ndarray | None = None, chunk: int = 64,
    ) -> list[Ranked]:
        """Exact inner-product top-k of ``queries`` against ``matrix`` (whose row i is row_id
        ``rows[i]``, or i); rows outside ``mask`` never rank."""
        kk = min(k, len(matrix) if mask is None else int(mask.sum()))
        out: list[Ranked] = []
        for start in range(0, len(queries), chunk):
            block = queries[start : start + chunk]
            sims = (matrix @ block[0])[None, :] if len(block) == 1 else block @ matrix.T
            if mask is not None:
                sims[:, ~mask] = -np.inf
            for row in sims:
                top = _top_k(row, kk)
                out.append(((top if rows is None else rows[top]).astype(np.int64), row[top].astype(np.float32), strategy))
        return out

    def selector_params(self, mask: np.ndarray) -> faiss.SearchParameters:
        """SearchParameters carrying an ``IDSelectorBitmap`` of ``mask`` and the index's own
        efSearch/nprobe (FAISS would otherwise fall back to its defaults)."""
        import faiss

        self._bitmap = np.packbits(mask, bitorder="little")  # the selector does not copy: keep it alive
        selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(self._bitmap))
        self._selector = selector
        if isinstance(self._inner, faiss.IndexHNSW):
            return faiss.SearchParametersHNSW(sel=selector, efSearch=self._inner.hnsw.efSearch)
        if isinstance(self._inner, faiss.IndexIVF):
            return faiss.SearchParametersIVF(sel=selector, nprobe=self._inner.nprobe)
        return faiss.SearchParameters(sel=selector)

    @staticmethod
    def _valid(ids: np.ndarray, sims: np.ndarray, strategy: str) -> Ranked:
        keep = ids >= 0  # FAISS pads missing results with -1
        return ids[keep].astype(np.int64), sims[keep], strategy


_RANKERS: weakref.WeakKeyDictionary[Store, Ranker] = weakref.WeakKeyDictionary()


def ranker_for(store: Store) -> Ranker:
    """One :class:`Ranker` per open store, so repeated searches reuse its vector copy."""
    if store not in _RANKERS:
        _RANKERS[store] = Ranker(store.index())
    return _RANKERS[store]


def _flat_buffer(inner: faiss.Index, n: int) -> np.ndarray | None:
    """A zero-copy (n, d) view of the vectors a flat (or HNSW-over-flat) index stores, else None."""
    import faiss

    storage = faiss.downcast_index(inner.storage) if isinstance(inner, faiss.IndexHNSW) else inner
    if not isinstance(storage, faiss.IndexFlat):
        return None
    if n == 0:
        return np.zeros((0, storage.d), dtype=np.float32)
    return faiss.rev_swig_ptr(storage.get_xb(), n * storage.d).reshape(n, storage.d)


def _top_k(sims: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values, best first (argpartition keeps this O(n))."""
    if k == 0:
        return np.empty(0, dtype=np.int64)
    part = np.argpartition(-sims, k - 1)[:k]
    return part[np.argsort(-sims[part], kind="stable")]


def _rows_by_id(con: duckdb.DuckDBPyConnection, row_ids: np.ndarray) -> dict[int, dict]:
    """Metadata of just the neighbour rows (DuckDB prunes row groups on the sorted row_id)."""
    cols = ", ".join(f'"{c}"' for c in _META_COLUMNS)
    table = con.sql(f"SELECT {cols} FROM images WHERE row_id IN (SELECT unnest($ids))", params={"ids": row_ids.tolist()})
    return {row["row_id"]: row for row in table.to_arrow_table().to_pylist()}


def _neighbor(rank: int, row: dict, similarity: float) -> Neighbor:
    flags = [row[f] for f in FINDINGS]
    findings = None if any(f is None for f in flags) else tuple(f for f, v in zip(FINDINGS, flags, strict=True) if v)
    return Neighbor(
        rank=rank,
        row_id=row["row_id"],
        image_id=row["image_id"],
        path=row["path"],
        patient_id=row["patient_id"],
        similarity=similarity,
        label=row["label"],
        findings=findings,
        split=row["split"],
        sex=row["sex"],
        age=row["age"],
        view=row["view"],
    )


@dataclass(frozen=True)
class StoredQuery:
    """A stored image used as a query: its vector and patient."""

    image_id: str
    row_id: int
    patient_id: str | None
    vector: np.ndarray


def stored_queries(store: Store, image_ids: Sequence[str]) -> list[StoredQuery]:
    """Look up stored images by id (only their Parquet rows are read); QueryError names unknown ids."""
    con = connect_readonly(store)
    try:
        table = con.sql(
            "SELECT e.image_id, e.row_id, i.patient_id, e.embedding FROM embeddings e JOIN images i USING (row_id) "
            "WHERE e.image_id IN (SELECT unnest($ids))",
            params={"ids": list(image_ids)},
        ).to_arrow_table()
    finally:
        con.close()
    found = {row["image_id"]: row for row in table.to_pylist()}
    missing = [i for i in image_ids if i not in found]
    if missing:
        raise QueryError(
            f"Image id(s) not in the store: {', '.join(missing[:5])}. "
            "List ids with: cxr-embed sql --store DIR \"SELECT image_id FROM images LIMIT 10\""
        )
    return [
        StoredQuery(i, int(found[i]["row_id"]), found[i]["patient_id"], np.asarray(found[i]["embedding"], np.float32))
        for i in image_ids
    ]


def search_by_ids(
    store: Store,
    image_ids: Sequence[str],
    k: int = 10,
    where: str | None = None,
    exclude_same_patient: bool = False,
    vote: Vote = "weighted",
) -> list[SearchResult]:
    """Neighbours of stored images, never the query image itself; with ``exclude_same_patient`` none
    shares the query's patient either."""
    found = stored_queries(store, image_ids)
    excluded = [q.patient_id for q in found] if exclude_same_patient else None
    vectors = np.stack([q.vector for q in found])
    return search(store, vectors, k, where, excluded, vote=vote, queries=list(image_ids),
                  exclude_rows=[q.row_id for q in found])


def embed_query_images(store: Store, model: MedImageInsight, paths: Sequence[str | Path]) -> np.ndarray:
    """Embed new images with the store's own model and preprocessing (refused if they differ)."""
    store.check_compatible(model.model_id, model.checkpoint_sha256, model.preprocessor.fingerprint())
    return np.asarray(model.embed_paths([str(p) for p in paths]), dtype=np.float32)


def stored_rows_of_paths(store: Store, paths: Sequence[str | Path]) -> list[tuple[int, str | None] | None]:
    """(row_id, patient_id) of each file already in the store (matched by resolved path), else None."""
    resolved = [str(Path(p).resolve()) for p in paths]
    con = connect_readonly(store)
    try:
        rows = con.execute(
            "SELECT path, min(row_id), any_value(patient_id) FROM images WHERE path IN (SELECT unnest($p)) GROUP BY path",
            {"p": resolved},
        ).fetchall()
    finally:
        con.close()
    by_path = {path: (int(row), patient) for path, row, patient in rows}
    return [by_path.get(p) for p in resolved]


def search_by_images(
    store: Store,
    model: MedImageInsight,
    paths: Sequence[str | Path],
    k: int = 10,
    where: str | None = None,
    exclude_same_patient: bool = False,
    patient_ids: Sequence[str | None] | None = None,
    vote: Vote = "weighted",
) -> list[SearchResult]:
    """Neighbours of image files. A file that is itself in the store never gets its own row back.
    The patient to exclude is ``patient_ids[i]`` when given, else the patient of the same file in
    the store; excluding with neither known is a ConfigError."""
    stored = stored_rows_of_paths(store, paths)
    excluded = None
    if exclude_same_patient:
        known = [found[1] if found else None for found in stored]
        excluded = [given or found for given, found in zip(patient_ids or [None] * len(paths), known, strict=True)]
        unknown = [str(p) for p, pid in zip(paths, excluded, strict=True) if pid is None]
        if unknown:
            raise ConfigError(
                f"Cannot exclude the same patient for {unknown[0]}: the image is not in the store. "
                "Give its patient with --patient-id."
            )
    vectors = embed_query_images(store, model, paths)
    own = [found[0] if found else None for found in stored]
    return search(store, vectors, k, where, excluded, vote=vote, queries=[str(p) for p in paths], exclude_rows=own)


def search_by_texts(
    store: Store,
    model: MedImageInsight,
    texts: Sequence[str],
    k: int = 10,
    where: str | None = None,
    vote: Vote = "weighted",
) -> list[SearchResult]:
    """Images closest to free-text descriptions, via the text tower in the shared embedding space."""
    # text skips image preprocessing, so only the model identity must match the store's
    store.check_compatible(model.model_id, model.checkpoint_sha256, store.preprocess_fingerprint)
    vectors = np.asarray(model.encode_texts(list(texts)), dtype=np.float32)
    return search(store, vectors, k, where, vote=vote, queries=list(texts))
