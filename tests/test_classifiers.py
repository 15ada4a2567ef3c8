"""The five classifiers on numpy arrays: probabilities, quality against exact sklearn, array state."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxr_embed import classifiers as C
from cxr_embed import metrics
from cxr_embed.array_state import TreeEnsemble
from cxr_embed.cohort import synthetic_cohort
from cxr_embed.errors import ConfigError


@pytest.fixture(scope="module")
def split():
    c = synthetic_cohort(700, 24, separation=2.5, n_clusters=6, seed=2)
    X, y = c.embeddings, c.labels.astype(int)
    # rows are sorted by patient, so contiguous blocks are (almost) patient-disjoint
    return X[:400], y[:400], X[400:500], y[400:500], X[500:], y[500:]


@pytest.fixture(scope="module")
def fitted(split):
    """Each classifier with its defaults, fitted once for the tests below."""
    X, y, Xv, yv, _, _ = split
    with C.compute_threads(*X.shape):
        return {name: C.make_classifier(name, seed=0).fit(X, y, Xv, yv) for name in C.CLASSIFIER_NAMES}


@pytest.mark.parametrize("name", C.CLASSIFIER_NAMES)
def test_classifier_gives_probabilities_with_signal(name: str, split, fitted) -> None:
    _, _, _, _, Xt, yt = split
    model = fitted[name]
    with C.compute_threads(*Xt.shape):
        p = model.predict_proba(Xt)
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


def test_hyper_parameters_are_picked_on_the_held_out_slice(split, fitted) -> None:
    X, y, Xv, yv, _, _ = split
    assert fitted["knn"].k_ in C.KnnClassifier.grid
    assert fitted["lr"].C_ in C.LogisticClassifier.grid
    assert C.LogisticClassifier(C=0.5).fit(X, y, Xv, yv).C_ == 0.5
    assert fitted["svm"].C_ in C.SvmClassifier.grid


@pytest.mark.parametrize("name", C.CLASSIFIER_NAMES)
def test_state_is_plain_numbers_and_arrays_and_rebuilds_exactly(name: str, split, fitted) -> None:
    Xt = split[4]
    model = fitted[name]
    params, arrays = model.get_state()
    assert json.loads(json.dumps(params)) == params  # JSON as it is, no objects
    assert set(arrays) == set(model.ARRAYS) and all(isinstance(a, np.ndarray) for a in arrays.values())
    rebuilt = C.classifier_class(name).from_state(json.loads(json.dumps(params)), arrays)
    assert np.array_equal(rebuilt.predict_proba(Xt), model.predict_proba(Xt))


def test_forest_arrays_predict_like_sklearn(split) -> None:
    from sklearn.ensemble import RandomForestClassifier

    X, y, _, _, Xt, _ = split
    forest = RandomForestClassifier(n_estimators=30, min_samples_leaf=2, n_jobs=1, random_state=0).fit(X, y)
    ours = TreeEnsemble.from_sklearn(forest).predict_proba(Xt, chunk=64)  # several chunks
    assert np.allclose(ours, forest.predict_proba(Xt)[:, 1], rtol=0, atol=1e-12)


def test_logistic_coefficients_predict_like_sklearn(split) -> None:
    from sklearn.linear_model import LogisticRegression

    X, y, _, _, Xt, _ = split
    ours = C.LogisticClassifier(C=0.1).fit(X, y)
    exact = LogisticRegression(C=0.1, max_iter=1000).fit(ours.scaler_(X), y).predict_proba(ours.scaler_(Xt))[:, 1]
    assert np.allclose(ours.predict_proba(Xt), exact, rtol=0, atol=1e-12)


def test_state_that_does_not_fit_is_refused(split) -> None:
    X, y, _, _, _, _ = split
    params, arrays = C.KnnClassifier(k=5).fit(X, y).get_state()
    with pytest.raises(ValueError, match=r"unexpected tensors \['extra'\]"):
        C.KnnClassifier.from_state(params, {**arrays, "extra": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match="tensor labels has shape"):
        C.KnnClassifier.from_state(params, {**arrays, "labels": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="tensor train is float64"):
        C.KnnClassifier.from_state(params, {**arrays, "train": arrays["train"].astype(np.float64)})
    with pytest.raises(ValueError, match="k_ must be"):
        C.KnnClassifier.from_state({**params, "k_": 10**6}, arrays)
    with pytest.raises(ValueError, match="not plain numbers"):
        C.KnnClassifier.from_state({**params, "k": "__import__('os')"}, arrays)
    fparams, farrays = C.ForestClassifier(n_estimators=3).fit(X, y).get_state()
    loop = farrays["trees.left"].copy()
    loop[np.flatnonzero(loop >= 0)[-1]] = 0  # a child pointing back to the root would never terminate
    with pytest.raises(ValueError, match="back up a tree"):
        C.ForestClassifier.from_state(fparams, {**farrays, "trees.left": loop})


def test_parse_models_and_thread_limits() -> None:
    import torch

    assert C.parse_models("svm, LR,svm") == ["svm", "lr"]
    with pytest.raises(ConfigError, match="choose from"):
        C.parse_models("svm,xgb")
    before = torch.get_num_threads()
    with C.compute_threads(10, 10):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_knn_out_of_fold_votes_never_count_the_row_itself() -> None:
    """Pure-noise labels: an out-of-fold vote that counted the row itself would score above chance."""
    from cxr_embed.crossval import cross_validate
    from cxr_embed.plans import patient_group_folds

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(400, 8)).astype(np.float32), rng.integers(0, 2, 400)
    groups = np.arange(400)
    folds = patient_group_folds(y, groups, 4, seed=0)
    (result,) = cross_validate(X, y, groups, folds, ["knn"], n_boot=0, fold_n_boot=0)
    assert sorted(result.rows) == list(range(400))  # every row scored exactly once, by a model not trained on it
    assert abs(metrics.roc_auc(result.labels, result.prob) - 0.5) < 0.1
    with_itself = C.KnnClassifier(k=5).fit(X, y).predict_proba(X)  # what counting the row itself looks like
    assert metrics.roc_auc(y, with_itself) > 0.7
