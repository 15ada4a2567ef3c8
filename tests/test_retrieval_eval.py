"""Retrieval quality: the ranking metrics on a hand-checkable toy, patient exclusion, and a store whose
findings are findable (clustered vectors) against a shuffled-label control."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cxr_embed.errors import ConfigError
from cxr_embed.records import FINDINGS
from cxr_embed.retrieval_eval import (
    ARM,
    RetrievalEvalConfig,
    evaluate_store,
    neighbours_excluding_patient,
    ranking_metrics,
    relevant_outside_patient,
    write_report,
)
from cxr_embed.stats import mean_cis
from cxr_embed.store import build_store_from_arrays


def test_ranking_metrics_equal_a_hand_computation() -> None:
    # query 0: relevant at ranks 1 and 3 of 4, R = 3; query 1: nothing relevant retrieved, R = 2
    relevant = np.array([[1, 0, 1, 0], [0, 0, 0, 0]], dtype=bool)
    out = ranking_metrics(relevant, np.array([3, 2]), k=4)
    assert out["precision"].tolist() == [0.5, 0.0]
    # AP@4 = (1/1 + 2/3) / min(4, 3)
    assert out["map"][0] == pytest.approx((1 + 2 / 3) / 3)
    assert out["map"][1] == 0.0
    dcg = 1 / math.log2(2) + 1 / math.log2(4)
    idcg = 1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert out["ndcg"][0] == pytest.approx(dcg / idcg)
    assert out["ndcg"][1] == 0.0


def test_ranking_metrics_undefined_without_relevant_rows() -> None:
    out = ranking_metrics(np.zeros((1, 3), dtype=bool), np.array([0]), k=3)
    assert out["precision"][0] == 0.0 and np.isnan(out["map"][0]) and np.isnan(out["ndcg"][0])


def test_neighbours_never_include_the_query_patient() -> None:
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(40, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    patients = np.repeat(np.arange(10), 4).astype(str)  # 4 near-identical-patient images each

    def search(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims = q @ vecs.T
        order = np.argsort(-sims, axis=1)[:, :k]
        return np.take_along_axis(sims, order, axis=1), order

    nb = neighbours_excluding_patient(search, vecs, patients, patients, k=5)
    assert (nb.positions >= 0).all()
    assert not (patients[nb.positions] == patients[:, None]).any()
    assert not (nb.positions == np.arange(40)[:, None]).any()
    # and they are the best five of the other patients
    sims = vecs @ vecs.T
    sims[patients[:, None] == patients[None, :]] = -np.inf
    assert np.array_equal(nb.positions, np.argsort(-sims, axis=1)[:, :5])


def test_relevant_counts_leave_out_the_query_patient() -> None:
    y = np.array([1, 1, 0, 1, 0])
    patients = np.array(["a", "a", "b", "c", "c"])
    counts = relevant_outside_patient({"abnormal": y}, {"abnormal": y}, patients, patients)["abnormal"]
    # row 0 (abnormal, patient a): abnormal rows of other patients = row 3 only
    assert counts.tolist() == [1, 1, 1, 2, 1]


def test_clustered_ci_is_wider_than_per_image_on_correlated_queries() -> None:
    rng = np.random.default_rng(1)
    patient_effect = rng.normal(size=50)
    values = np.repeat(patient_effect, 8) + 0.1 * rng.normal(size=400)
    clustered = mean_cis({"v": values}, np.repeat(np.arange(50), 8), n_boot=500)["v"]
    per_image = mean_cis({"v": values}, np.arange(400), n_boot=500)["v"]
    assert clustered[0] == pytest.approx(per_image[0])
    assert (clustered[2] - clustered[1]) > 2 * (per_image[2] - per_image[1])


def _clustered_store(path, shuffle: bool):
    """120 images of 40 patients; each finding pulls the vector towards its own direction."""
    rng = np.random.default_rng(7)
    n, dim = 120, 32
    findings = rng.random((n, 3)) < 0.3
    directions = rng.normal(size=(3, dim))
    emb = rng.normal(size=(n, dim)) * 0.6 + findings.astype(float) @ directions * 1.5
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = findings.any(axis=1).astype(int)
    if shuffle:
        perm = rng.permutation(n)
        findings, labels = findings[perm], labels[perm]
    rows = []
    for i in range(n):
        row = {
            "image_id": f"img{i:03d}",
            "path": f"img{i:03d}.png",
            "patient_id": f"p{i // 3}",
            "label": int(labels[i]),
        }
        row.update({name: int(findings[i, j]) if j < 3 else 0 for j, name in enumerate(FINDINGS)})
        rows.append(row)
    return build_store_from_arrays(path, emb.astype(np.float32), rows, index_kind="hnsw")


@pytest.fixture(scope="module")
def eval_stores(tmp_path_factory: pytest.TempPathFactory):
    real = _clustered_store(tmp_path_factory.mktemp("real"), shuffle=False)
    control = _clustered_store(tmp_path_factory.mktemp("control"), shuffle=True)
    config = RetrievalEvalConfig(ks=(1, 5), label="all-findings", n_boot=200)
    return evaluate_store(real, config), evaluate_store(control, config)


def _value(report, kind: str, target: str, metric: str, k: int) -> float:
    (row,) = [r for r in report.rows if (r.index_kind, r.target, r.metric, r.k) == (kind, target, metric, k)]
    return row.value


def test_findings_are_findable_beyond_a_shuffled_control(eval_stores) -> None:
    real, control = eval_stores
    for finding in FINDINGS[:3]:
        assert (
            _value(real, "exact", finding, "precision", 5)
            >= _value(control, "exact", finding, "precision", 5) + 0.25
        )
    assert _value(real, "exact", "abnormal", "knn_auc", 5) >= 0.8
    assert _value(control, "exact", "abnormal", "knn_auc", 5) <= 0.7


def test_report_covers_both_index_kinds_with_cis(eval_stores) -> None:
    real, _ = eval_stores
    assert {r.index_kind for r in real.rows} == {"exact", "index"}
    assert real.params["bootstrap_unit"] == "patient" and real.params["n_queries"] == 120
    for row in real.rows:
        if not math.isnan(row.value):
            assert row.ci_low <= row.value + 1e-9 and row.value <= row.ci_high + 1e-9
    # HNSW on 120 rows finds the same neighbours as brute force
    assert _value(real, "index", "abnormal", "map", 5) == pytest.approx(
        _value(real, "exact", "abnormal", "map", 5)
    )


def test_where_and_sample_limit_the_queries(tmp_path) -> None:
    store = _clustered_store(tmp_path / "s", shuffle=False)
    report = evaluate_store(
        store, RetrievalEvalConfig(ks=(3,), where="row_id < 60", sample=20, n_boot=0, index_kinds=("exact",))
    )
    assert report.params["n_database"] == 60 and report.params["n_queries"] <= 21
    with pytest.raises(ConfigError, match="--label"):
        evaluate_store(store, RetrievalEvalConfig(label="fracture"))


def test_mean_cis_leave_undefined_rows_out() -> None:
    out = mean_cis({"a": np.array([1.0, np.nan, 3.0]), "b": np.full(3, np.nan)}, np.arange(3), n_boot=50)
    assert out["a"][0] == 2.0 and 1.0 <= out["a"][1] <= out["a"][2] <= 3.0
    assert all(np.isnan(v) for v in out["b"])


def test_plan_queries_its_test_side_against_its_training_side(tmp_path) -> None:
    from cxr_embed.plans import PlanSettings, get_or_make_plan

    store = _clustered_store(tmp_path / "s", shuffle=False)
    plan = get_or_make_plan(store, PlanSettings(kind="holdout", test_fraction=0.25))
    n_test = int((plan.split == "test").sum())
    report = evaluate_store(
        store, RetrievalEvalConfig(ks=(1, 5), n_boot=50, plan_id=plan.plan_id, index_kinds=("exact",))
    )
    assert report.params["n_queries"] == n_test
    assert report.params["n_database"] == len(plan) - n_test
    assert _value(report, "exact", "abnormal", "knn_auc", 5) >= 0.75
    run_id = write_report(store, report)
    metrics = store.read_results("metrics").to_pylist()
    mine = [m for m in metrics if m["run_id"] == run_id]
    assert {m["arm"] for m in mine} == {ARM} and {m["plan_id"] for m in mine} == {plan.plan_id}
    assert {m["metric"] for m in mine} >= {"precision@5", "map@5", "ndcg@1", "knn_auc@5"}
    kfold = get_or_make_plan(store, PlanSettings(kind="kfold", folds=3))
    report = evaluate_store(
        store, RetrievalEvalConfig(ks=(5,), n_boot=0, plan_id=kfold.plan_id, index_kinds=("exact",))
    )
    assert report.params["n_queries"] == len(kfold)  # every row is a query once, against the other folds


def test_precision_figure_is_written(eval_stores, tmp_path) -> None:
    from cxr_embed.plots import plot_retrieval

    path = plot_retrieval(tmp_path / "p.png", eval_stores[0].rows, 5)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_search_eval_command_prints_records_and_plots(tmp_path) -> None:
    import json

    from cxr_embed_cli.main import app
    from typer.testing import CliRunner

    store = _clustered_store(tmp_path / "s", shuffle=False)
    res = CliRunner().invoke(
        app,
        [
            "search",
            "eval",
            "--store",
            str(store.path),
            "--k",
            "1,5",
            "--label",
            "atelectasis",
            "--n-boot",
            "20",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert {r["metric"] for r in doc["rows"]} == {"precision", "map", "ndcg"}
    assert {r["target"] for r in doc["rows"]} == {"atelectasis"}
    assert (tmp_path / "s" / "plots" / doc["run_id"]).is_dir() and doc["figure"].endswith(".png")
    bad = CliRunner().invoke(app, ["search",
            "eval", "--store", str(store.path), "--k", "0"])
    assert bad.exit_code == 1 and "--k" in bad.stderr
