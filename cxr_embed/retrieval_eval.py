"""How good are the neighbours? Retrieval quality of a store, measured the way retrieval papers do.

Every query image is searched with its own patient excluded (a patient's other images are near
duplicates: counting them would measure re-identification, not case retrieval). A neighbour is
*relevant* when it shares the query's target: the binary label (``abnormal``), one finding, or, for
``all-findings``, each finding separately over the queries positive for it. Reported per index kind
(``exact`` brute force vs the store's own ``index``, so the cost of approximation is visible):

* precision@k: the fraction of the k neighbours that are relevant;
* mAP@k: average precision truncated at k, normalised by ``min(k, R)`` where R is the number of
  relevant rows the query could have found;
* nDCG@k: binary-gain DCG with a log2 discount over the ideal DCG of ``min(k, R)`` hits;
* the kNN-vote ROC-AUC of the binary label (weighted vote over the k neighbours).

Uncertainty is a patient-clustered bootstrap (patients resampled with replacement, each carrying all
its queries): images of one patient are correlated, so resampling images would give CIs too narrow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from cxr_embed.errors import ConfigError
from cxr_embed.metrics import roc_auc
from cxr_embed.records import FINDINGS
from cxr_embed.retrieval import Ranker, allowed_mask, index_search
from cxr_embed.stats import PATIENT, auc_ci, mean_cis

if TYPE_CHECKING:
    import pyarrow as pa

    from cxr_embed.store import Store

SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
"""(queries, k) -> (similarities, database positions), FAISS-shaped; -1 pads missing results."""

RANKING_METRICS = ("precision", "map", "ndcg")
#: The ``arm`` of retrieval rows in the ``metrics`` table.
ARM = "retrieval"


@dataclass(frozen=True)
class Neighbours:
    """Top-k database positions per query (-1 where fewer exist) and their similarities."""

    positions: np.ndarray
    similarities: np.ndarray


def neighbours_excluding_patient(
    search: SearchFn, queries: np.ndarray, query_patients: np.ndarray, db_patients: np.ndarray, k: int
) -> Neighbours:
    """The k best database rows of each query whose patient differs from the query's.

    Why over-fetch: an index cannot filter by "not this query's patient" (the mask differs per
    query), so each query asks for ``k`` plus the size of its patient's largest image set, then drops
    its own patient's rows; a query still short of k (possible with approximate indexes) asks again
    with twice as many until the database is exhausted.
    """
    n_db = len(db_patients)
    positions = np.full((len(queries), k), -1, dtype=np.int64)
    sims = np.full((len(queries), k), -np.inf, dtype=np.float32)
    per_patient = np.unique(db_patients, return_counts=True)[1]
    fetch = min(n_db, k + (int(per_patient.max()) if per_patient.size else 0))
    todo = np.arange(len(queries))
    while todo.size:
        got_sims, got_ids = search(queries[todo], fetch)
        short = []
        for row, q in enumerate(todo):
            ids = got_ids[row]
            keep = (ids >= 0) & (db_patients[np.maximum(ids, 0)] != query_patients[q])
            ids, s = ids[keep][:k], got_sims[row][keep][:k]
            positions[q, : ids.size], sims[q, : ids.size] = ids, s
            if ids.size < k and fetch < n_db:
                short.append(q)
        todo = np.asarray(short, dtype=np.int64)
        fetch = min(n_db, fetch * 2)
    return Neighbours(positions, sims)


def ranking_metrics(relevant: np.ndarray, n_relevant: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per-query precision@k, AP@k and nDCG@k from a (queries, >=k) boolean relevance matrix.

    ``n_relevant``: how many relevant rows each query could have retrieved (sets the ideal). Queries
    with no relevant row get AP and nDCG of NaN (undefined), precision of 0.
    """
    rel = relevant[:, :k].astype(np.float64)
    hits = np.cumsum(rel, axis=1)
    ranks = np.arange(1, k + 1, dtype=np.float64)
    ideal_hits = np.minimum(n_relevant, k).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.where(ideal_hits > 0, (rel * hits / ranks).sum(axis=1) / ideal_hits, np.nan)
        discount = 1.0 / np.log2(ranks + 1.0)
        ideal = np.cumsum(discount)
        idcg = np.where(ideal_hits > 0, ideal[np.maximum(ideal_hits.astype(int), 1) - 1], np.nan)
        ndcg = (rel * discount).sum(axis=1) / idcg
    return {"precision": rel.sum(axis=1) / k, "map": ap, "ndcg": ndcg}


def knn_vote(labels: np.ndarray, sims: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Weighted kNN vote per query: sum of max(sim, 0) over abnormal neighbours / over all (0.5 if none)."""
    w = np.where(valid, np.maximum(sims, 0.0), 0.0)
    total = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (w * (labels == 1)).sum(axis=1) / total, 0.5)


@dataclass(frozen=True)
class RetrievalRow:
    """One measured figure: ``metric`` at ``k`` for ``target`` on ``index_kind``, with its CI."""

    index_kind: str
    target: str
    metric: str
    k: int
    value: float
    ci_low: float
    ci_high: float
    n_queries: int


@dataclass
class RetrievalReport:
    """All rows of one evaluation plus how it was made (recorded with the results)."""

    rows: list[RetrievalRow] = field(default_factory=list)
    params: dict[str, object] = field(default_factory=dict)


def targets_for(label: str) -> list[str]:
    """The relevance targets a ``--label`` value asks for."""
    if label == "abnormal":
        return ["abnormal"]
    if label == "all-findings":
        return ["abnormal", *FINDINGS]
    if label in FINDINGS:
        return [label]
    raise ConfigError(
        f"Unknown --label {label!r}: use abnormal, all-findings or one of {', '.join(FINDINGS)}."
    )


def evaluate_neighbours(
    index_kind: str,
    neighbours: Neighbours,
    query_targets: dict[str, np.ndarray],
    db_targets: dict[str, np.ndarray],
    query_patients: np.ndarray,
    relevant_counts: dict[str, np.ndarray],
    ks: Sequence[int],
    n_boot: int,
    seed: int,
) -> list[RetrievalRow]:
    """Score one index kind's neighbours against each target (see the module docstring).

    ``query_targets[t]`` / ``db_targets[t]``: 0/1 per query / database row (-1 = unknown: such
    queries are skipped for that target, such neighbours count as not relevant).
    ``relevant_counts[t]``: per query, the relevant database rows outside its own patient.
    """
    pos = neighbours.positions
    valid = pos >= 0
    rows: list[RetrievalRow] = []
    for target, q_y in query_targets.items():
        db_y = db_targets[target]
        nb_y = np.where(valid, db_y[np.maximum(pos, 0)], -1)
        # binary label: relevant = same label as the query; a finding: queries positive for it only
        if target == "abnormal":
            use = q_y >= 0
            relevant = (nb_y == q_y[:, None]) & valid
        else:
            use = q_y == 1
            relevant = (nb_y == 1) & valid
        for k in ks:
            per_query = ranking_metrics(relevant[use], relevant_counts[target][use], k)
            cis = mean_cis(per_query, query_patients[use], n_boot=n_boot, seed=seed)
            for metric in RANKING_METRICS:
                rows.append(RetrievalRow(index_kind, target, metric, k, *cis[metric], int(use.sum())))
        if target == "abnormal":
            for k in ks:
                vote = knn_vote(nb_y[:, :k], neighbours.similarities[:, :k], valid[:, :k])
                value = roc_auc(q_y[use], vote[use])
                low, high = (
                    auc_ci(q_y[use], vote[use], clusters=query_patients[use], n_boot=n_boot, seed=seed)
                    if not np.isnan(value)
                    else (float("nan"), float("nan"))
                )
                rows.append(RetrievalRow(index_kind, target, "knn_auc", k, value, low, high, int(use.sum())))
    return rows


def relevant_outside_patient(
    query_targets: dict[str, np.ndarray],
    db_targets: dict[str, np.ndarray],
    query_patients: np.ndarray,
    db_patients: np.ndarray,
) -> dict[str, np.ndarray]:
    """Per target and query: how many database rows of OTHER patients are relevant (the ideal's R)."""
    codes, db_inverse = np.unique(db_patients, return_inverse=True)
    q_code = np.searchsorted(codes, query_patients)
    q_known = (q_code < codes.size) & (codes[np.minimum(q_code, codes.size - 1)] == query_patients)
    out: dict[str, np.ndarray] = {}
    for target, q_y in query_targets.items():
        db_y = db_targets[target]
        # count per (patient, class) so "relevant minus my own patient's relevant" is one lookup
        per_patient = {c: np.bincount(db_inverse, weights=(db_y == c), minlength=codes.size) for c in (0, 1)}
        totals = {c: float((db_y == c).sum()) for c in (0, 1)}
        want = np.where(q_y == 1, 1, 0) if target == "abnormal" else np.ones_like(q_y)
        own = np.where(
            q_known,
            np.where(
                want == 1,
                per_patient[1][np.minimum(q_code, codes.size - 1)],
                per_patient[0][np.minimum(q_code, codes.size - 1)],
            ),
            0.0,
        )
        out[target] = np.where(want == 1, totals[1], totals[0]) - own
    return out


@dataclass(frozen=True)
class RetrievalEvalConfig:
    """What ``search eval`` measures. ``where``: SQL condition on ``images`` limiting queries and
    database; ``sample``: at most this many queries (stratified by label, seeded); ``plan_id``: a
    stored evaluation plan whose test rows are the queries and whose training rows the database
    (K folds: each fold's test rows search the other folds), so retrieval is scored on the same
    rows as the classifiers."""

    ks: tuple[int, ...] = (1, 5, 10)
    label: str = "abnormal"
    where: str | None = None
    sample: int | None = None
    index_kinds: tuple[str, ...] = ("exact", "index")
    n_boot: int = 1000
    seed: int = 0
    plan_id: str | None = None


@dataclass(frozen=True)
class _Split:
    """Database and query rows (positions in the store's metadata order) searched together."""

    database: np.ndarray
    queries: np.ndarray


def _splits(
    store: Store, config: RetrievalEvalConfig, row_ids: np.ndarray, labels: np.ndarray
) -> list[_Split]:
    """Without a plan: every allowed row (or a sample) against every allowed row. With one: per fold,
    its test rows against its training rows (``--where`` further restricts both sides)."""
    mask = allowed_mask(store, config.where)
    allowed = np.arange(len(row_ids)) if mask is None else np.flatnonzero(mask[row_ids])
    if config.plan_id is None:
        return [_Split(allowed, _sample_queries(allowed, labels, config.sample, config.seed))]
    from cxr_embed.plans import load_plan

    plan = load_plan(store, config.plan_id)
    members = plan.positions(row_ids)
    out = []
    for fold in plan.folds():
        db = np.intersect1d(members[fold.train], allowed)
        queries = np.intersect1d(members[fold.test], allowed)
        out.append(_Split(db, _sample_queries(queries, labels, config.sample, config.seed + fold.index)))
    return out


def evaluate_store(store: Store, config: RetrievalEvalConfig) -> RetrievalReport:
    """Retrieval quality of ``store`` (see the module docstring); every query excludes its patient."""
    if not config.ks or min(config.ks) < 1:
        raise ConfigError("--k must list positive integers, e.g. 1,5,10.")
    targets = targets_for(config.label)
    meta = store.metadata(columns=["row_id", "patient_id", "label", *FINDINGS])
    row_ids = meta.column("row_id").to_numpy()
    patients = _patient_keys(meta.column("patient_id").to_pylist(), row_ids)
    values = {t: _target_values(meta, t) for t in dict.fromkeys(["abnormal", *targets])}
    splits = _splits(store, config, row_ids, values["abnormal"])
    smallest = min(s.database.size for s in splits)
    if smallest < 2 or not sum(s.queries.size for s in splits):
        raise ConfigError(
            "search eval needs at least two database rows and one query (check --where/--plan)."
        )
    kmax = min(max(config.ks), smallest - 1)
    ks = tuple(sorted({min(k, kmax) for k in config.ks}))
    queries = np.concatenate([s.queries for s in splits])
    embeddings = store.embeddings()
    q_targets = {t: values[t][queries] for t in targets}
    relevant = {
        t: np.concatenate(
            [
                relevant_outside_patient(
                    {t: values[t][s.queries]},
                    {t: values[t][s.database]},
                    patients[s.queries],
                    patients[s.database],
                )[t]
                for s in splits
            ]
        )
        for t in targets
    }
    report = RetrievalReport(
        params={
            "ks": list(ks),
            "label": config.label,
            "where": config.where,
            "sample": config.sample,
            "plan_id": config.plan_id,
            "n_queries": int(queries.size),
            "n_database": int(np.unique(np.concatenate([s.database for s in splits])).size),
            "bootstrap_unit": PATIENT,
            "n_boot": config.n_boot,
            "seed": config.seed,
            "index_kind": store.index_kind,
        }
    )
    for kind in config.index_kinds:
        parts = []
        for s in splits:
            search = (
                _exact_search(embeddings[s.database])
                if kind == "exact"
                else _index_search(store, row_ids, s.database)
            )
            q_vecs = np.ascontiguousarray(embeddings[s.queries], dtype=np.float32)
            nb = neighbours_excluding_patient(search, q_vecs, patients[s.queries], patients[s.database], kmax)
            # database positions -> store positions, so every split indexes the same target arrays
            parts.append(
                Neighbours(
                    np.where(nb.positions >= 0, s.database[np.maximum(nb.positions, 0)], -1), nb.similarities
                )
            )
        nb = Neighbours(
            np.concatenate([p.positions for p in parts]), np.concatenate([p.similarities for p in parts])
        )
        report.rows += evaluate_neighbours(
            kind,
            nb,
            q_targets,
            {t: values[t] for t in targets},
            patients[queries],
            relevant,
            ks,
            config.n_boot,
            config.seed,
        )
    return report


def write_report(store: Store, report: RetrievalReport, timings: dict[str, float] | None = None) -> str:
    """Append the report to the store's ``metrics`` table (arm ``retrieval``, classifier = index kind,
    metric ``precision@5`` …) with a ``runs`` row; returns the run id."""
    from cxr_embed.results import metrics_table, new_run_id, write_results

    run_id = new_run_id("retrieval")
    tables = []
    for kind, target in dict.fromkeys((r.index_kind, r.target) for r in report.rows):
        rows = [
            (f"{r.metric}@{r.k}", r.value, r.ci_low, r.ci_high)
            for r in report.rows
            if (r.index_kind, r.target) == (kind, target)
        ]
        tables.append(
            metrics_table(run_id, ARM, kind, target, -1, rows, plan_id=report.params.get("plan_id"))
        )
    write_results(store, run_id, "retrieval", report.params, timings or {}, [], tables)
    return run_id


def _patient_keys(patient_ids: list[str | None], row_ids: np.ndarray) -> np.ndarray:
    """Patient per row; an unknown patient is its own patient (only that image is excluded)."""
    return np.asarray(
        [p if p is not None else f"\x00row{r}" for p, r in zip(patient_ids, row_ids, strict=True)]
    )


def _target_values(meta: pa.Table, target: str) -> np.ndarray:
    """0/1 per row for ``target`` (-1 = unknown)."""
    column = "label" if target == "abnormal" else target
    return np.asarray([-1 if v is None else int(v) for v in meta.column(column).to_pylist()], dtype=np.int64)


def _sample_queries(db: np.ndarray, labels: np.ndarray, sample: int | None, seed: int) -> np.ndarray:
    """All database rows, or a label-stratified random ``sample`` of them (sorted, reproducible)."""
    if sample is None or sample >= db.size:
        return db
    rng = np.random.default_rng(seed)
    picked = []
    for value in np.unique(labels[db]):
        members = db[labels[db] == value]
        share = max(1, round(sample * members.size / db.size))
        picked.append(rng.choice(members, size=min(share, members.size), replace=False))
    return np.sort(np.concatenate(picked))[: max(sample, 1)]


def _exact_search(vectors: np.ndarray) -> SearchFn:
    """Brute-force inner product over ``vectors`` (FAISS flat: batched BLAS)."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return lambda q, k: index.search(q, k)


def _index_search(store: Store, row_ids: np.ndarray, db: np.ndarray) -> SearchFn:
    """The store's own index, restricted to the database rows, answering in database positions."""
    ranker = Ranker(store.index())  # holds the selector bitmap alive for the closure
    position = np.full(int(row_ids.max()) + 1, -1, dtype=np.int64)
    position[row_ids[db]] = np.arange(db.size)
    params = None
    if db.size < len(row_ids):
        mask = np.zeros(int(row_ids.max()) + 1, dtype=bool)
        mask[row_ids[db]] = True
        params = ranker.selector_params(mask)

    def search(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims, ids = index_search(ranker.index, q, k, params)
        return sims, np.where(ids >= 0, position[np.maximum(ids, 0)], -1)

    return search


@dataclass(frozen=True)
class RecordedEval:
    """A report with where it was recorded (``run_id``/``figure`` are None when not saved)."""

    report: RetrievalReport
    run_id: str | None
    figure: str | None


def evaluate_and_record(store: Store, config: RetrievalEvalConfig, *, save: bool = True) -> RecordedEval:
    """``search eval``: evaluate, then (``save``) write the metrics rows and the precision@k figure
    (``plots/<run_id>/retrieval_precision_at_<k>.png``, k = the middle cut-off)."""
    import time

    t0 = time.perf_counter()
    report = evaluate_store(store, config)
    if not save:
        return RecordedEval(report, None, None)
    run_id = write_report(store, report, {"evaluate": time.perf_counter() - t0})
    from pathlib import Path

    from cxr_embed.plots import plot_retrieval

    ks = report.params["ks"]
    k = ks[len(ks) // 2]
    figure = plot_retrieval(
        Path(store.path) / "plots" / run_id / f"retrieval_precision_at_{k}.png", report.rows, k
    )
    return RecordedEval(report, run_id, str(figure))
