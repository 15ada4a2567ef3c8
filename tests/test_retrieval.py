"""Similar-case search over real stores (Parquet + FAISS + DuckDB): filters before ranking, patient
exclusion, the kNN vote, and text queries through the tiny model's text tower."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_embed import retrieval
from cxr_embed.errors import QueryError, StoreMismatchError

QUERY = "00000003_004.png"  # patient 00000003, abnormal


def brute_force(store, query_id: str, k: int, keep) -> list[str]:
    """Exact top-k image_ids among the rows for which ``keep(row)`` holds (numpy, no FAISS)."""
    emb = store.embeddings()
    rows = store.metadata().to_pylist()
    allowed = np.array([i for i, r in enumerate(rows) if keep(r)])
    q = emb[[r["image_id"] for r in rows].index(query_id)]
    sims = emb[allowed] @ q
    return [rows[i]["image_id"] for i in allowed[np.argsort(-sims, kind="stable")[:k]]]


@pytest.fixture(scope="module")
def hnsw_store(tmp_path_factory, search_arrays):
    from cxr_embed.store import build_store_from_arrays

    emb, rows = search_arrays
    return build_store_from_arrays(tmp_path_factory.mktemp("hnsw") / "store", emb, rows, index_kind="hnsw")


@pytest.fixture(params=["flat", "hnsw"])
def any_store(request, search_store, hnsw_store):
    return search_store if request.param == "flat" else hnsw_store


def test_query_image_is_never_its_own_neighbour(any_store) -> None:
    result = retrieval.search_by_ids(any_store, [QUERY], k=5)[0]
    assert [n.rank for n in result] == [1, 2, 3, 4, 5]
    assert QUERY not in {n.image_id for n in result} and result.excluded_row is not None
    assert [n.image_id for n in result] == brute_force(any_store, QUERY, 5, lambda r: r["image_id"] != QUERY)
    assert result.candidates == 2000 - 1
    # the patient's own follow-ups are the naive neighbours: the reason --exclude-same-patient exists
    assert {n.patient_id for n in result} == {"00000003"}
    assert result[0].findings is not None and result[0].label == 1


def test_self_exclusion_under_a_filter_and_in_batches(search_store) -> None:
    ids = ["00000003_004.png", "00000001_000.png", "00000002_000.png"]
    for result in retrieval.search_by_ids(search_store, ids, k=3):  # one batch, each drops its own row
        assert len(result) == 3 and result.query not in {n.image_id for n in result}
    subset = retrieval.search_by_ids(search_store, [QUERY], k=50, where="patient_id = '00000003'")[0]
    assert QUERY not in {n.image_id for n in subset} and len(subset) == subset.candidates == 9


def test_exclude_same_patient_drops_every_image_of_the_patient(any_store) -> None:
    result = retrieval.search_by_ids(any_store, [QUERY], k=10, exclude_same_patient=True)[0]
    assert len(result) == 10
    assert all(n.patient_id != "00000003" for n in result)
    assert result.candidates == 2000 - 10
    assert [n.image_id for n in result] == brute_force(any_store, QUERY, 10, lambda r: r["patient_id"] != "00000003")


def test_filter_keeping_one_percent_returns_k_equal_to_brute_force(any_store) -> None:
    result = retrieval.search_by_ids(any_store, [QUERY], k=10, where="view = 'LL'")[0]
    assert result.candidates == 20 and result.strategy == "exact-subset"
    assert len(result) == 10 and all(n.view == "LL" for n in result)
    assert [n.image_id for n in result] == brute_force(any_store, QUERY, 10, lambda r: r["view"] == "LL")


BROAD = "view = 'AP' AND age >= 30"  # ~42% of rows: above the exact-subset cut-off


def broad_keep(r: dict) -> bool:
    return r["view"] == "AP" and r["age"] >= 30 and r["patient_id"] != "00000003"


def test_broad_filter_on_flat_index_is_exact(search_store) -> None:
    result = retrieval.search_by_ids(search_store, [QUERY], k=10, where=BROAD, exclude_same_patient=True)[0]
    assert result.strategy == "exact"
    assert [n.image_id for n in result] == brute_force(search_store, QUERY, 10, broad_keep)


def test_broad_filter_on_hnsw_goes_through_the_faiss_selector(hnsw_store) -> None:
    result = retrieval.search_by_ids(hnsw_store, [QUERY], k=10, where=BROAD, exclude_same_patient=True)[0]
    assert result.strategy == "index+selector"
    assert len(result) == 10 and all(n.view == "AP" and n.age >= 30 and n.patient_id != "00000003" for n in result)
    assert len({n.image_id for n in result} & set(brute_force(hnsw_store, QUERY, 10, broad_keep))) >= 9


def test_under_filled_ivf_probe_falls_back_to_exact(tmp_path, search_arrays) -> None:
    import faiss

    from cxr_embed.store import build_store_from_arrays

    emb, rows = search_arrays
    store = build_store_from_arrays(tmp_path / "ivf", emb, rows, index_kind="ivf")
    ivf = faiss.downcast_index(store.index().index)
    ivf.nprobe = 1
    _, lists = ivf.quantizer.search(emb, 1)
    probed = np.flatnonzero(lists[:, 0] == lists[[r["image_id"] for r in rows].index(QUERY), 0])
    where = f"row_id NOT IN ({', '.join(map(str, probed))})"  # the one probed list holds no allowed row
    result = retrieval.search_by_ids(store, [QUERY], k=10, where=where)[0]
    assert result.candidates > 0.05 * len(store) and result.strategy == "exact-subset"
    assert [n.image_id for n in result] == brute_force(store, QUERY, 10, lambda r: r["image_id"] not in {rows[i]["image_id"] for i in probed})


def test_fewer_matching_rows_than_k_returns_them_all(search_store) -> None:
    result = retrieval.search_by_ids(search_store, [QUERY], k=10, where="patient_id = '00000007'")[0]
    assert len(result) == 10
    result = retrieval.search_by_ids(search_store, [QUERY], k=50, where="patient_id = '00000007'")[0]
    assert len(result) == 10 and {n.patient_id for n in result} == {"00000007"}


def test_batched_vectors_and_per_query_exclusion(search_store) -> None:
    found = retrieval.stored_queries(search_store, ["00000001_000.png", "00000002_000.png"])
    vectors = np.stack([q.vector for q in found])
    results = retrieval.search(search_store, vectors, k=3, exclude_patients=["00000001", None])
    assert "00000001" not in {n.patient_id for n in results[0]}
    assert results[1][0].image_id == "00000002_000.png"


def test_malformed_where_reports_duckdb_message(search_store) -> None:
    with pytest.raises(QueryError, match="Invalid --where.*(Parser|Binder) Error"):
        retrieval.search_by_ids(search_store, [QUERY], where="view = = 'PA'")
    with pytest.raises(QueryError, match="no_such_column"):
        retrieval.search_by_ids(search_store, [QUERY], where="no_such_column > 1")
    with pytest.raises(QueryError, match="one statement"):
        retrieval.search_by_ids(search_store, [QUERY], where="1 = 1); DROP VIEW images; SELECT (1")


def test_unknown_id_and_wrong_dimension_are_query_errors(search_store) -> None:
    with pytest.raises(QueryError, match="not in the store: nope.png"):
        retrieval.search_by_ids(search_store, ["nope.png"])
    with pytest.raises(QueryError, match="7 dims"):
        retrieval.search(search_store, np.ones((1, 7), np.float32))


def test_knn_vote_weighted_plain_and_unknown() -> None:
    assert retrieval.knn_vote([0.9, 0.1], [1, 0]) == pytest.approx(0.9)
    assert retrieval.knn_vote([0.9, 0.1], [1, 0], vote="plain") == pytest.approx(0.5)
    assert retrieval.knn_vote([0.9, 0.5], [None, 0]) == 0.0  # unlabelled neighbours do not vote
    assert retrieval.knn_vote([0.9], [None]) is None
    assert retrieval.knn_vote([-0.2, -0.4], [1, 0]) == pytest.approx(0.5)  # no positive weight: plain vote


def test_vote_probability_in_results(search_store) -> None:
    result = retrieval.search_by_ids(search_store, [QUERY], k=10)[0]
    assert result.probability_abnormal == pytest.approx(1.0)  # all 10 are the abnormal patient's other images
    expected = retrieval.knn_vote([n.similarity for n in result], [n.label for n in result])
    assert result.probability_abnormal == expected and QUERY not in {n.image_id for n in result}


def test_query_label_never_votes(tmp_path, search_arrays) -> None:
    """A query whose label differs from all its neighbours: counting itself would move the vote off 0."""
    from cxr_embed.store import build_store_from_arrays

    emb, rows = search_arrays
    rows = [dict(r) for r in rows]
    neighbours = {n.image_id for n in retrieval.search_by_ids(
        build_store_from_arrays(tmp_path / "a", emb, rows), [QUERY], k=5, exclude_same_patient=True)[0]}
    for r in rows:
        if r["image_id"] in neighbours:
            r["label"] = 0
        if r["image_id"] == QUERY:
            r["label"] = 1
    store = build_store_from_arrays(tmp_path / "b", emb, rows)
    result = retrieval.search_by_ids(store, [QUERY], k=5, exclude_same_patient=True, vote="plain")[0]
    assert {n.image_id for n in result} == neighbours and result.probability_abnormal == 0.0


@pytest.fixture(scope="module")
def tiny_identity_store(tmp_path_factory, search_arrays, tiny_model):
    """The synthetic vectors filed under the tiny model's identity (its embed_dim is 32 too)."""
    from cxr_embed.store import build_store_from_arrays

    emb, rows = search_arrays
    return build_store_from_arrays(
        tmp_path_factory.mktemp("tinyid") / "store", emb, rows, model_id=tiny_model.model_id,
        checkpoint_sha256=tiny_model.checkpoint_sha256, preprocess_fingerprint=tiny_model.preprocessor.fingerprint(),
    )


def test_text_query_returns_results(tiny_identity_store, tiny_model) -> None:
    result = retrieval.search_by_texts(tiny_identity_store, tiny_model, ["pleural effusion"], k=5, where="view = 'PA'")[0]
    assert len(result) == 5 and result.query == "pleural effusion"
    assert all(n.view == "PA" for n in result)
    sims = [n.similarity for n in result]
    assert sims == sorted(sims, reverse=True) and all(-1.0 <= s <= 1.0 for s in sims)


def test_query_with_another_model_is_refused(search_store, tiny_model) -> None:
    with pytest.raises(StoreMismatchError, match="different model"):
        retrieval.search_by_texts(search_store, tiny_model, ["pleural effusion"])


@pytest.mark.slow  # one tiny-model forward
def test_image_query_of_a_stored_file_skips_its_own_row(tiny_store, tiny_model) -> None:
    row = tiny_store.metadata(["row_id", "image_id", "path", "patient_id"]).to_pylist()[5]
    result = retrieval.search_by_images(tiny_store, tiny_model, [row["path"]], k=3)[0]
    assert len(result) == 3 and result.query == row["path"] and result.excluded_row == row["row_id"]
    assert row["image_id"] not in {n.image_id for n in result}


def test_patient_of_an_image_query(tiny_store, tiny_model, tmp_path) -> None:
    import shutil

    from cxr_embed.errors import ConfigError

    row = tiny_store.metadata(["row_id", "path", "patient_id"]).to_pylist()[0]
    copy = tmp_path / "new.png"
    shutil.copy(row["path"], copy)
    found = retrieval.stored_rows_of_paths(tiny_store, [row["path"], copy])
    assert found[0] == (row["row_id"], row["patient_id"]) and found[1] is None
    with pytest.raises(ConfigError, match="--patient-id"):  # refused before any embedding work
        retrieval.search_by_images(tiny_store, tiny_model, [copy], exclude_same_patient=True)
