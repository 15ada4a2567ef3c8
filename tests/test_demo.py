"""``cxr-embed demo`` on a fresh machine: every stage leaves real results that sql, search and Python read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cxr_embed_cli.main import app
from typer.testing import CliRunner

from cxr_embed.demo import DemoConfig, prepare_out, run_demo
from cxr_embed.errors import ConfigError
from cxr_embed.store import Store

FROZEN = {"svm", "lr", "knn", "rf", "mlp"}
pytestmark = pytest.mark.slow  # every test here shares the demo fixture (about a minute of CPU once)


def test_demo_falls_back_to_the_tiny_model_loudly(demo_run) -> None:
    assert demo_run.result["tiny_model"] is True
    assert "TINY TEST MODEL" in demo_run.stderr and "NOTHING clinically" in demo_run.stderr
    assert demo_run.result["notices"] and "cxr-embed model pull" in demo_run.result["notices"][0]


def test_demo_store_holds_embeddings_and_both_arms(demo_run, demo_store: Store) -> None:
    from tests.conftest import DEMO_N

    assert len(demo_store) + demo_run.result["n_errors"] == DEMO_N and len(demo_store) == DEMO_N
    emb = demo_store.embeddings()
    assert emb.shape == (DEMO_N, 32) and abs(float((emb**2).sum(axis=1).mean()) - 1.0) < 1e-4
    con = demo_store.connect()
    frozen = {r[0] for r in con.sql("SELECT DISTINCT classifier FROM predictions WHERE arm = 'frozen'").fetchall()}
    assert frozen == FROZEN
    finetuned = con.sql("SELECT count(*), count(row_id) FROM predictions WHERE arm = 'finetuned'").fetchall()[0]
    assert finetuned[0] > 0 and finetuned[0] == finetuned[1]  # test-split rows, joinable to the store
    # both arms on the same hold-out plan: every frozen classifier scored exactly the fine-tune's test images
    sets = con.sql("SELECT arm, classifier, plan_id, list(image_id ORDER BY image_id) FROM latest_predictions "
                   "GROUP BY ALL").fetchall()
    assert len(sets) == 6 and len({s[2] for s in sets}) == 1 and len({tuple(s[3]) for s in sets}) == 1
    assert len(sets[0][3]) == finetuned[0] == demo_run.result["n_test_images"]
    kinds = {r[0] for r in con.sql("SELECT kind FROM runs").fetchall()}
    assert kinds == {"classify", "finetune"}


def test_summary_table_compares_the_arms(demo_run) -> None:
    table = demo_run.result["study_table"]
    assert {(r["arm"], r["classifier"]) for r in table} == {("frozen", c) for c in FROZEN} | {("finetuned", "finetune")}
    for row in table:
        assert 0.0 <= row["roc_auc"] <= 1.0 and 0.0 <= row["brier"] <= 1.0
        low, high = row["roc_auc_ci"]  # patients resampled: on ~15 test images a wide interval
        assert 0.0 <= low <= high <= 1.0
    compared = [r for r in table if r["delong_p"] is not None]
    assert len(compared) == 5 and all(0.0 <= r["delong_p"] <= 1.0 for r in compared)  # every arm vs the reference
    assert demo_run.result["reference"].startswith("frozen/")
    assert set(demo_run.result["timings"]) >= {"synth", "index", "classify", "finetune", "study", "search", "sql", "total"}
    marker = json.loads((demo_run.out / "demo.json").read_text())
    assert marker["status"] == "complete"


def test_printed_sql_examples_run_through_the_sql_command(demo_run) -> None:
    runner = CliRunner()
    for example in demo_run.result["sql_examples"]:
        res = runner.invoke(app, ["sql", "--store", str(demo_run.store), example["sql"], "--json"])
        assert res.exit_code == 0, res.stderr
        assert len(json.loads(res.stdout)) == example["rows"] > 0, example["title"]


def test_search_command_on_the_demo_store(demo_run, demo_store: Store) -> None:
    query = demo_run.result["search"][0]["query"]
    res = CliRunner().invoke(
        app, ["search", "--store", str(demo_run.store), "--id", query, "-k", "3", "--exclude-same-patient", "--json"]
    )
    assert res.exit_code == 0, res.stderr
    neighbours = json.loads(res.stdout)["neighbors"]
    assert len(neighbours) == 3
    con = demo_store.connect()
    patient = con.sql("SELECT patient_id FROM images WHERE image_id = $id", params={"id": query}).fetchall()[0][0]
    assert all(n["patient_id"] != patient for n in neighbours)
    # the demo's own search excluded the patient too, and the text query returned k results
    assert all(n["patient_id"] != patient for n in demo_run.result["search"][0]["neighbors"])
    assert len(demo_run.result["search"][1]["neighbors"]) == 5


def test_demo_refuses_to_overwrite_what_is_not_its_own(demo_run, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="already holds a demo"):
        prepare_out(demo_run.out, force=False)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a cxr-embed demo folder"):
        prepare_out(tmp_path, force=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="at least 40"):
        run_demo(DemoConfig(out=tmp_path / "new", n=10))


def test_demo_cli_error_is_a_message(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["demo", "--dir", str(tmp_path / "d"), "--n", "5"])
    assert res.exit_code == 1 and "Error:" in res.stderr and "Traceback" not in res.stderr


@pytest.fixture(scope="module")
def demo_store(demo_run) -> Store:
    return Store.open(demo_run.store)


def test_choose_model_falls_back_only_when_nothing_was_named(tmp_path: Path) -> None:
    from cxr_embed.demo import choose_model
    from cxr_embed.errors import ModelNotFoundError
    from cxr_embed.model import tiny_model_dir

    assert choose_model(tiny_model_dir()) == (tiny_model_dir(), True)
    with pytest.raises(ModelNotFoundError):
        choose_model(tmp_path / "no-such-model")  # a folder the user named must exist: no silent fallback
