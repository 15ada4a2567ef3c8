"""FAISS index construction: every kind keeps ids == row_ids and answers real searches."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from cxr_embed import indexes
from cxr_embed.errors import ConfigError


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.normal(size=(800, 32)).astype(np.float32)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_every_kind_maps_ids_to_row_ids_and_finds_itself(kind: str, vectors: np.ndarray, tmp_path) -> None:
    ids = np.arange(len(vectors))
    index, info = indexes.build_index(vectors, ids, kind, use_gpu=False)
    faiss.write_index(index, str(tmp_path / "i.faiss"))
    index = indexes.read_index(tmp_path / "i.faiss")  # the saved form is what stores use
    assert info.kind == kind and info.ntotal == len(vectors)
    np.testing.assert_array_equal(indexes.index_ids(index), ids)
    queries = indexes.normalized(vectors[:50])
    _, hits = index.search(queries, 5)
    self_found = np.mean([i in row for i, row in enumerate(hits)])
    assert self_found >= (1.0 if kind == "flat" else 0.8), f"{kind}: only {self_found:.0%} of vectors find themselves"
    recon = indexes.reconstruct_rows(index, ids[:100])
    err = np.abs(recon - indexes.normalized(vectors[:100])).max()
    assert err < (1e-6 if kind != "ivfpq" else 1.0)


def test_vectors_are_normalised_so_scores_are_cosines(vectors: np.ndarray) -> None:
    index, _ = indexes.build_index(vectors * 7.0, np.arange(len(vectors)), "flat", use_gpu=False)
    scores, hits = index.search(indexes.normalized(vectors[:3]), 1)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    np.testing.assert_array_equal(hits[:, 0], [0, 1, 2])


def test_auto_picks_flat_then_ivf_and_bad_kinds_are_refused() -> None:
    assert indexes.resolve_kind("auto", 1000) == "flat"
    assert indexes.resolve_kind("auto", indexes.AUTO_FLAT_MAX_ROWS + 1) == "ivf"
    assert indexes.resolve_kind("ivf", 0) == "flat"  # nothing to train on
    with pytest.raises(ConfigError, match="Unknown index kind 'annoy'"):
        indexes.resolve_kind("annoy", 10)


def test_growing_adds_in_place_until_ivf_centroids_go_stale(vectors: np.ndarray) -> None:
    index, info = indexes.build_index(vectors[:600], np.arange(600), "ivf", use_gpu=False)
    assert not indexes.needs_rebuild(info, "ivf", 700)
    assert indexes.needs_rebuild(info, "ivf", 600 * 5)  # trained on far fewer rows
    assert indexes.needs_rebuild(info, "flat", 700)  # kind changed
    info = indexes.add_to_index(index, info, vectors[600:], np.arange(600, 800))
    assert info.ntotal == 800 and info.trained_on == 600
    np.testing.assert_array_equal(indexes.index_ids(index), np.arange(800))
    _, hits = index.search(indexes.normalized(vectors[700:701]), 1)
    assert hits[0, 0] == 700
