"""The five classifiers on numpy arrays: probabilities, quality against exact sklearn, persistence."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_embed import classifiers as C
from cxr_embed import metrics
from cxr_embed.cohort import synthetic_cohort
from cxr_embed.errors import ConfigError


@pytest.fixture(scope="module")
def split():
    c = synthetic_cohort(700, 24, separation=2.5, n_clusters=6, seed=2)
    X, y = c.embeddings, c.labels.astype(int)
    # rows are sorted by patient, so contiguous blocks are (almost) patient-disjoint
    return X[:400], y[:400], X[400:500], y[400:500], X[500:], y[500:]


@pytest.mark.parametrize("name", C.CLASSIFIER_NAMES)
def test_classifier_gives_probabilities_with_signal(name: str, split) -> None:
    X, y, Xv, yv, Xt, yt = split
    model = C.make_classifier(name, seed=0)
    with C.compute_threads(*X.shape):
        p = model.fit(X, y, Xv, yv).predict_proba(Xt)
    assert p.shape == (len(Xt),) and p.dtype == np.float64
    assert np.all((p >= 0) & (p <= 1))
    assert metrics.roc_auc(yt, p) > 0.85
    assert np.array_equal(p, model.predict_proba(Xt))  # deterministic at prediction time


@pytest.mark.filterwarnings("ignore:The `probability` parameter:FutureWarning")
def test_nystroem_svm_matches_exact_rbf_svc(split) -> None:
    from sklearn.svm import SVC

    X, y, Xv, yv, Xt, yt = split
    ours = C.SvmClassifier(seed=0).fit(X, y, Xv, yv).predict_proba(Xt)
    exact = SVC(kernel="rbf", gamma="scale", C=1.0, probability=True, random_state=0).fit(X, y).predict_proba(Xt)[:, 1]
    assert abs(metrics.roc_auc(yt, ours) - metrics.roc_auc(yt, exact)) < 0.02
    assert np.corrcoef(ours, exact)[0, 1] > 0.9


def test_knn_matches_sklearn_when_nothing_is_reduced(split) -> None:
    from sklearn.neighbors import KNeighborsClassifier

    X, y, _, _, Xt, _ = split
    ours = C.KnnClassifier(k=15, n_components=X.shape[1]).fit(X, y).predict_proba(Xt)
    exact = KNeighborsClassifier(15).fit(X, y).predict_proba(Xt)[:, 1]
    assert np.mean(np.abs(ours - exact)) < 0.01  # PCA with all components is a rotation: same neighbours


def test_hyper_parameters_are_picked_on_the_held_out_slice(split) -> None:
    X, y, Xv, yv, _, _ = split
    assert C.KnnClassifier().fit(X, y, Xv, yv).k_ in C.KnnClassifier.grid
    assert C.LogisticClassifier().fit(X, y, Xv, yv).C_ in C.LogisticClassifier.grid
    assert C.LogisticClassifier(C=0.5).fit(X, y, Xv, yv).C_ == 0.5
    assert C.SvmClassifier().fit(X, y, Xv, yv).C_ in C.SvmClassifier.grid


def test_saved_state_has_no_faiss_index(split) -> None:
    X, y, _, _, Xt, _ = split
    knn = C.KnnClassifier(k=5).fit(X, y)
    knn.predict_proba(Xt[:3])
    state = knn.__getstate__()
    assert "_faiss" not in state and "train_" in state


def test_parse_models_and_thread_limits() -> None:
    import torch

    assert C.parse_models("svm, LR,svm") == ["svm", "lr"]
    with pytest.raises(ConfigError, match="choose from"):
        C.parse_models("svm,xgb")
    before = torch.get_num_threads()
    with C.compute_threads(10, 10):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
