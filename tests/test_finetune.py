"""Fine-tuning: optimiser set-up, schedule, augmentation, exact resume, splits, and end-to-end runs
with the tiny reference model on synthetic ChestX-ray14 data (CPU, 480x480 input as the model needs)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cxr_embed.errors import CheckpointError, ConfigError
from cxr_embed.finetune import (
    EMA,
    FineTuneConfig,
    FineTuneNet,
    TrainState,
    augment_batch,
    epoch_batches,
    finetune,
    load_checkpoint,
    lr_at,
    param_groups,
    patient_splits,
    resume_config,
    save_checkpoint,
    save_run_config,
    step_generator,
    targets_of,
)
from cxr_embed.model import MedImageInsight, tiny_model_dir
from cxr_embed.records import ImageRecord

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------ fast units


def test_param_groups_follow_the_reference_no_decay_rules(tiny_model):
    named = list(tiny_model.module.named_parameters())
    decay, plain = param_groups(named, 0.2)
    assert decay["weight_decay"] == 0.2 and plain["weight_decay"] == 0.0
    dn, pn = set(decay["names"]), set(plain["names"])
    assert not dn & pn and dn | pn == {n for n, _ in named}
    shapes = {n: p.ndim for n, p in named}
    for name in pn:   # gains/offsets (any 1-D tensor), depthwise convs, norms, embeddings, logit_scale
        assert shapes[name] <= 1 or ".dw." in name or "embedding" in name, name
    assert "logit_scale" in pn
    assert "image_encoder.blocks.0.0.spatial_block.conv1.fn.dw.weight" in pn   # depthwise conv: 4-D yet no decay
    assert "image_encoder.norms.weight" in pn and "image_encoder.convs.1.proj.bias" in pn
    assert "image_encoder.blocks.0.0.spatial_block.window_attn.fn.qkv.weight" in dn
    assert "image_encoder.convs.0.proj.weight" in dn and "image_projection" in dn


def test_head_gets_its_own_learning_rate_scale(tiny_model):
    net = FineTuneNet(tiny_model.module.image_encoder, tiny_model.module.image_encoder.num_features, 1)
    groups = param_groups(list(net.named_parameters()), 0.2, head_lr_scale=10.0)
    is_head = [any(n.startswith("head.") for n in g["names"]) for g in groups]
    head = [g for g, h in zip(groups, is_head, strict=True) if h]
    tower = [g for g, h in zip(groups, is_head, strict=True) if not h]
    assert {n for g in head for n in g["names"]} == {"head.weight", "head.bias"}
    assert all(g["lr_scale"] == 10.0 for g in head) and all(g["lr_scale"] == 1.0 for g in tower)
    assert all(not n.startswith("head.") for g in tower for n in g["names"])


def test_lr_warms_up_linearly_then_decays_by_cosine():
    total, warm, base = 100, 10, 1e-5
    lrs = [lr_at(s, total, warm, base, 1e-9) for s in range(total)]
    assert lrs[0] == pytest.approx(base / warm) and lrs[warm - 1] == pytest.approx(base)
    assert all(a < b for a, b in zip(lrs[:warm - 1], lrs[1:warm], strict=True))
    assert all(a >= b for a, b in zip(lrs[warm:-1], lrs[warm + 1:], strict=True))
    assert lrs[warm + (total - warm) // 2] == pytest.approx((base + 1e-9) / 2, rel=1e-3)
    assert lr_at(total, total, warm, base, 1e-9) == pytest.approx(1e-9)


def test_augmentation_is_reproducible_and_never_flips_unless_asked():
    x = (torch.rand(4, 3, 64, 64) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    a = augment_batch(x, step_generator(0, 5, 0), MEAN, STD)
    assert torch.equal(a, augment_batch(x, step_generator(0, 5, 0), MEAN, STD))   # resume repeats the draws
    assert not torch.allclose(a, augment_batch(x, step_generator(0, 6, 0), MEAN, STD))
    assert a.shape == x.shape and not torch.allclose(a, x)
    pixels = a * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    still = dict(max_rotation_deg=0.0, scale=(1.0, 1.0), brightness=0.0, contrast=0.0)
    same = augment_batch(x, step_generator(1, 0, 0), MEAN, STD, **still)
    torch.testing.assert_close(same, x, atol=1e-4, rtol=0)                          # no flip by default
    flipped = augment_batch(torch.cat([x] * 4), step_generator(1, 0, 0), MEAN, STD, hflip=True, **still)
    is_flip = [torch.allclose(f, torch.flip(o, [-1]), atol=1e-4) for f, o in zip(flipped, torch.cat([x] * 4), strict=True)]
    is_same = [torch.allclose(f, o, atol=1e-4) for f, o in zip(flipped, torch.cat([x] * 4), strict=True)]
    assert any(is_flip) and any(is_same) and all(a or b for a, b in zip(is_flip, is_same, strict=True))


def _toy(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, EMA]:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Dropout(0.5), torch.nn.Linear(5, 1))
    opt = torch.optim.AdamW(param_groups(list(net.named_parameters()), 0.2), lr=1e-2)
    return net, opt, EMA(list(net.named_parameters()), 0.9)


def _toy_step(net: torch.nn.Module, opt: torch.optim.Optimizer, ema: EMA) -> None:
    opt.zero_grad()
    net(torch.randn(8, 6)).pow(2).mean().backward()   # draws from torch's global RNG, like DropPath
    opt.step()
    ema.update(list(net.named_parameters()))


def test_checkpoint_roundtrip_resumes_bit_exactly(tmp_path):
    """Optimizer moments, EMA, scaler and all RNG states survive safetensors+JSON (no pickle)."""
    net, opt, ema = _toy(0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(3):
        _toy_step(net, opt, ema)
    random.random(), np.random.rand()
    save_checkpoint(tmp_path, net=net, optimizer=opt, scaler=scaler, ema=ema, state=TrainState(epoch=1, global_step=3))
    expected_py, expected_np = random.random(), np.random.rand()
    for _ in range(2):
        _toy_step(net, opt, ema)
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    net2, opt2, ema2 = _toy(123)   # different init and RNG: everything must come from the checkpoint
    state = load_checkpoint(tmp_path, net=net2, optimizer=opt2, scaler=scaler, ema=ema2)
    assert (state.epoch, state.global_step) == (1, 3)
    assert (random.random(), np.random.rand()) == (expected_py, expected_np)
    for _ in range(2):
        _toy_step(net2, opt2, ema2)
    for k, v in net2.state_dict().items():
        assert torch.equal(v, reference[k]), k
    assert all(torch.equal(ema.shadow[k], ema2.shadow[k]) for k in ema.shadow)
    assert not list(tmp_path.glob("**/*.pt")) and not list(tmp_path.glob("**/*.pkl"))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    net, opt, ema = _toy(0)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        load_checkpoint(tmp_path, net=net, optimizer=opt, scaler=torch.amp.GradScaler("cpu", enabled=False), ema=ema)


def _records(n_patients: int, per_patient: int, official: bool) -> list[ImageRecord]:
    out = []
    for p in range(n_patients):
        for k in range(per_patient):
            label = (p + k) % 2
            split = ("test" if p % 4 == 0 else "train") if official else None
            out.append(ImageRecord(f"{p:05d}_{k:03d}.png", f"/x/{p}_{k}.png", f"P{p}", k, split, label,
                                   (label,) + (0,) * 13, "M", 50.0, "PA", "synth"))
    return out


@pytest.mark.parametrize("official", [True, False])
def test_splits_are_patient_wise_and_honour_the_official_lists(official):
    recs = _records(20, 3, official)
    targets = targets_of(recs, "abnormal")
    s = patient_splits(recs, targets, val_fraction=0.2, test_fraction=0.25, seed=0)
    pats = {k: {recs[i].patient_id for i in v} for k, v in s.items()}
    assert not pats["train"] & pats["val"] and not pats["train"] & pats["test"] and not pats["val"] & pats["test"]
    assert sorted(np.concatenate(list(s.values()))) == list(range(len(recs)))
    if official:
        assert {i for i, r in enumerate(recs) if r.split == "test"} == set(s["test"])
    assert set(targets[s["val"], 0]) == {0.0, 1.0}   # stratified by patient: both classes validate
    again = patient_splits(recs, targets, val_fraction=0.2, test_fraction=0.25, seed=0)
    assert all(np.array_equal(s[k], again[k]) for k in s)


def test_epoch_order_is_a_seeded_permutation():
    a, b = epoch_batches(10, 0, 7, 4), epoch_batches(10, 1, 7, 4)
    assert [len(x) for x in a] == [4, 4, 2] and sorted(np.concatenate(a)) == list(range(10))
    assert [x.tolist() for x in a] == [x.tolist() for x in epoch_batches(10, 0, 7, 4)]
    assert np.concatenate(a).tolist() != np.concatenate(b).tolist()


def test_resume_refuses_changed_training_settings(tmp_path):
    save_run_config(FineTuneConfig(source="/data", out=str(tmp_path), lr=1e-4, epochs=3))
    with pytest.raises(ConfigError, match="lr"):
        resume_config(tmp_path, {"lr": 1e-3})
    cfg = resume_config(tmp_path, {"max_steps": 7, "workers": 2, "epochs": 3})
    assert (cfg.max_steps, cfg.workers, cfg.lr) == (7, 2, 1e-4)


def test_invalid_options_are_refused_before_any_work(tmp_path):
    for bad in ({"batch_size": 10, "accumulate": 3}, {"precision": "fp8"}, {"ema": 1.5}, {"label": "cats"}):
        with pytest.raises(ConfigError):
            FineTuneConfig(source=str(tmp_path), out=str(tmp_path / "o"), **bad).validate()


def test_cli_errors_are_messages_not_tracebacks(tmp_path):
    from cxr_embed_cli.main import app

    res = CliRunner().invoke(app, ["finetune", str(tmp_path), "--out", str(tmp_path / "run"), "--resume"])
    assert res.exit_code == 1 and "no fine-tuning run" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["finetune", str(tmp_path), "--out", str(tmp_path / "r2"), "--batch-size", "10",
                                   "--accumulate", "3"])
    assert res.exit_code == 1 and "multiple of --accumulate" in res.output


# ------------------------------------------------------------------------------ end-to-end (tiny model)


def _small_config(source: Path, out: Path, **kw) -> FineTuneConfig:
    """Cheap but complete: accumulation, EMA, augmentation, DropPath all on; stages 1-2 frozen for speed."""
    base = dict(source=str(source), out=str(out), dataset="chestxray14", model_dir=str(tiny_model_dir()),
                device="cpu", epochs=2, lr=1e-3, batch_size=2, accumulate=2, freeze_stages=2, ema=0.9, n_boot=50)
    return FineTuneConfig(**{**base, **kw})


@pytest.mark.slow
def test_interrupted_and_resumed_run_ends_with_identical_weights(synth_small, tmp_path):
    """SIGTERM mid-run, then --max-steps, then --resume twice == one uninterrupted run of the same steps."""
    from cxr_embed_cli.main import app

    straight = tmp_path / "straight"
    res = CliRunner().invoke(app, ["finetune", str(synth_small), "--out", str(straight), "--dataset", "chestxray14",
                                   "--model-dir", str(tiny_model_dir()), "--device", "cpu",
                                   "--epochs", "2", "--lr", "1e-3", "--batch-size", "2", "--accumulate", "2",
                                   "--freeze-stages", "2", "--ema", "0.9", "--max-steps", "3", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["status"] == "max_steps"

    def sigterm_after_first_step(info):
        if info.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    broken = tmp_path / "broken"
    first = finetune(_small_config(synth_small, broken), progress=False, on_step=sigterm_after_first_step)
    assert first.status == "interrupted" and first.state.global_step == 1 and first.model_dir is None
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # the handler is removed again
    second = finetune(resume_config(broken, {"max_steps": 2}), resume=True, progress=False)
    assert second.status == "max_steps" and second.state.global_step == 2
    res = CliRunner().invoke(app, ["finetune", str(synth_small), "--out", str(broken), "--resume",
                                   "--max-steps", "3", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["global_step"] == 3
    a = load_file(straight / "checkpoint" / "model.safetensors")
    b = load_file(broken / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    ea, eb = load_file(straight / "checkpoint" / "ema.safetensors"), load_file(broken / "checkpoint" / "ema.safetensors")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    sa, sb = (json.loads((d / "checkpoint" / "state.json").read_text()) for d in (straight, broken))
    assert sa["train"] == sb["train"] and len(sa["train"]["epoch_losses"]) == 3   # same position, same losses
    assert sa["optimizer"] == sb["optimizer"]
    # training really changed the unfrozen weights and left the frozen stages alone
    base = MedImageInsight.load(tiny_model_dir(), device="cpu").module.image_encoder.state_dict()
    assert torch.equal(a["encoder.blocks.0.0.spatial_block.window_attn.fn.qkv.weight"],
                       base["blocks.0.0.spatial_block.window_attn.fn.qkv.weight"])
    assert not torch.equal(a["encoder.blocks.3.0.channel_block.ffn.fn.net.fc1.weight"],
                           base["blocks.3.0.channel_block.ffn.fn.net.fc1.weight"])
    _check_export(straight)


def _check_export(run_dir: Path) -> None:
    """The exported folder loads with the strict loader, embeds, and differs from the base only in the tower."""
    from cxr_embed.store import RESULT_SCHEMAS

    base = MedImageInsight.load(tiny_model_dir(), device="cpu")
    tuned = MedImageInsight.load(run_dir / "model", device="cpu")
    assert tuned.model_id != base.model_id and tuned.checkpoint_sha256 != base.checkpoint_sha256
    b, t = base.module.state_dict(), tuned.module.state_dict()
    assert b.keys() == t.keys()
    assert all(torch.equal(b[k], t[k]) for k in b if not k.startswith("image_encoder."))
    best = load_file(run_dir / "best" / "model.safetensors")
    assert all(torch.equal(best[f"encoder.{k[len('image_encoder.'):]}"], v) for k, v in t.items()
               if k.startswith("image_encoder."))
    image = next(iter(sorted(Path(json.loads((run_dir / "config.json").read_text())["source"]).rglob("*.png"))))
    emb = tuned.embed_paths([image])
    assert emb.shape == (1, base.embed_dim) and np.isclose(np.linalg.norm(emb), 1.0)
    assert not np.allclose(emb, base.embed_paths([image]))
    head = load_file(run_dir / "model" / "head.safetensors")
    meta = json.loads((run_dir / "model" / "head.json").read_text())
    assert head["weight"].shape == (len(meta["targets"]), base.module.cfg.image.feature_dim)
    assert float(head["temperature"]) == pytest.approx(meta["temperature"]) and meta["temperature"] > 0
    for name in ("predictions", "metrics", "runs"):  # a run without --store writes these into its folder
        schema = RESULT_SCHEMAS[name]
        table = pq.read_table(run_dir / "results" / name)
        assert table.schema.names == schema.names and table.num_rows > 0
    preds = pq.read_table(run_dir / "results" / "predictions").to_pylist()
    assert {p["arm"] for p in preds} == {"finetuned"} and all(0 <= p["probability"] <= 1 for p in preds)
    assert len(preds) == len(json.loads((run_dir / "splits.json").read_text())["test"])


@pytest.mark.slow
def test_short_run_learns_and_writes_the_classify_tables_into_a_store(synth_cxr14, tmp_path):
    """Loss falls and validation ROC-AUC beats chance; predictions/metrics/runs land in the store, by row_id."""
    from cxr_embed.readers import read_dataset
    from cxr_embed.store import Store, build_store_from_arrays

    records = read_dataset(synth_cxr14)
    store = build_store_from_arrays(tmp_path / "store", np.eye(len(records), 8, dtype=np.float32) + 0.1, records)
    cfg = _small_config(synth_cxr14, tmp_path / "run", epochs=2, batch_size=4, accumulate=1, freeze_stages=3,
                        ema=None, val_fraction=0.3, store=str(tmp_path / "store"), split="official")
    result = finetune(cfg, progress=False)
    assert result.status == "completed" and result.state.global_step == 2 * math.ceil(result.n_images["train"] / 4)
    first, last = result.state.history[0], result.state.history[-1]
    assert last["train_loss"] < first["train_loss"]
    assert result.state.best_auc > 0.5
    assert 0 < result.test_metrics["abnormal"]["roc_auc"] <= 1
    st = Store.open(store.path)
    preds = st.read_results("predictions").to_pylist()
    ids = dict(zip(*(st.metadata(columns=["image_id", "row_id"]).column(c).to_pylist() for c in ("image_id", "row_id")),
                   strict=True))
    assert preds and all(p["arm"] == "finetuned" and p["row_id"] == ids[p["image_id"]] for p in preds)
    with st.connect() as con:
        n = con.execute("SELECT count(*) FROM metrics WHERE arm = 'finetuned' AND metric = 'roc_auc' AND fold = -1 "
                        "AND subgroup IS NULL"
                        ).fetchone()[0]
        kind = con.execute("SELECT kind FROM runs").fetchone()[0]
    assert n == 1 and kind == "finetune"
    assert list((tmp_path / "run" / "plots" / result.run_id).glob("*.png"))
    _both_arms_on_the_same_rows(st, result)


def _both_arms_on_the_same_rows(store, result) -> None:
    """classify on the fine-tune's plan scores exactly its test images; study pairs them; other plans are refused."""
    from cxr_embed.errors import EvaluationError
    from cxr_embed.evaluation import ClassifyConfig, classify_store
    from cxr_embed.study import StudyConfig, run_study

    frozen = classify_store(store, ClassifyConfig(models=("lr",), plan_id=result.plan_id, n_boot=0, refit=False,
                                                  plots=False))
    with store.connect() as con:
        ids = {arm: {v for (v,) in con.execute("SELECT image_id FROM latest_predictions WHERE arm = ?", [arm])
                     .fetchall()} for arm in ("frozen", "finetuned")}
    assert ids["frozen"] == ids["finetuned"] and len(ids["frozen"]) == result.n_images["test"]
    study = run_study(store, StudyConfig(n_boot=50, plots=False))
    assert study.plan_id == result.plan_id == frozen.plan_id and study.n_images == result.n_images["test"]
    (cmp,) = study.comparisons
    assert cmp.reference == "frozen/lr" and cmp.arm == "finetuned/finetune" and 0 <= cmp.delong_p <= 1
    other = classify_store(store, ClassifyConfig(models=("lr",), folds=2, n_boot=0, refit=False, plots=False))
    assert other.plan_id != result.plan_id
    with pytest.raises(EvaluationError, match="evaluated on plan .* cannot be compared"):
        run_study(store, StudyConfig(plan_id=other.plan_id, finetune_run=result.run_id, n_boot=0, plots=False))


@pytest.mark.slow
def test_fine_tuning_learns_the_label_above_chance(tmp_path_factory):
    """160 synthetic images, last stage + head trained: validation and test ROC-AUC clearly above 0.5.

    The tiny model has random weights, so its features carry only a weak signal (frozen LR: ~0.7);
    40 validation and 40 test images keep the AUC's standard error near 0.08, so 0.6 is a real margin.
    """
    from cxr_embed.synth import generate

    data = tmp_path_factory.mktemp("ft160")
    generate(data, 160, layout="chestxray14", seed=1, size=128)
    cfg = FineTuneConfig(source=str(data), out=str(tmp_path_factory.mktemp("ft160run") / "run"), dataset="chestxray14",
                         model_dir=str(tiny_model_dir()), device="cpu", epochs=3, lr=1e-3, head_lr_scale=30.0,
                         batch_size=8, freeze_stages=3, val_fraction=0.3, n_boot=50, patience=10, augment=False)
    result = finetune(cfg, progress=False)
    losses = [h["train_loss"] for h in result.state.history]
    assert losses[-1] < losses[0]
    assert result.n_images["val"] >= 30 and result.n_images["test"] >= 30
    assert result.state.best_auc >= 0.6
    assert result.test_metrics["abnormal"]["roc_auc"] >= 0.6


@pytest.mark.slow
def test_sweep_selects_on_validation_and_tests_the_chosen_cell_once(synth_small, tmp_path):
    """A 2-cell grid (one optimizer step each): validation only per cell, one cell tested, rerun trains nothing."""
    from cxr_embed.finetune.sweep import run_sweep

    cfg = _small_config(synth_small, tmp_path / "sweep", epochs=1, max_steps=1, batch_size=2, accumulate=1,
                        freeze_stages=3, ema=None)
    first = run_sweep(cfg, [1e-3, 1e-4], [0.2], progress=False)
    assert [c.status for c in first.cells] == ["max_steps", "max_steps"] and sum(c.selected for c in first.cells) == 1
    chosen = first.selected
    assert first.test is not None and first.test.test_metrics and first.test.run_id == chosen.run_id
    other = next(c for c in first.cells if not c.selected)
    assert json.loads((other.out / "result.json").read_text())["test_metrics"] == {}
    assert not (other.out / "results").exists() and (chosen.out / "results" / "predictions").is_dir()
    again = run_sweep(cfg, [1e-3, 1e-4], [0.2], progress=False)
    assert again.test is None and [c.run_id for c in again.cells] == [c.run_id for c in first.cells]
    assert len(list((chosen.out / "results" / "predictions").glob("*.parquet"))) == 1   # the test rows, once
    sweep = pq.read_table(tmp_path / "sweep" / "results" / "sweep").to_pylist()
    assert len(sweep) == 4 and {r["lr"] for r in sweep} == {1e-3, 1e-4}


@pytest.mark.parametrize("kind", ["kfold", "holdout"])
def test_plan_splits_follow_the_stored_plan(tmp_path, kind):
    """Fine-tuning on a plan trains/tests on the plan's rows: fold k as test (K folds) or the plan's own split."""
    from cxr_embed.finetune.runner import _plan_splits
    from cxr_embed.plans import PlanSettings, get_or_make_plan
    from cxr_embed.store import build_store_from_arrays

    recs = _records(30, 3, official=False)
    store = build_store_from_arrays(tmp_path / "store", np.eye(len(recs), 4, dtype=np.float32) + 0.1, recs)
    plan = get_or_make_plan(store, PlanSettings(kind=kind, folds=3, seed=0))
    cfg = FineTuneConfig(source="unused", out=str(tmp_path / "o"), store=str(store.path), plan=plan.plan_id,
                         fold=1 if kind == "kfold" else None, val_fraction=0.2)
    kept, targets, s = _plan_splits(recs, targets_of(recs, "abnormal"), cfg)
    by_id = dict(zip(plan.image_id, range(len(plan)), strict=True))
    test_ids = {kept[i].image_id for i in s["test"]}
    if kind == "kfold":
        assert test_ids == {i for i in plan.image_id if plan.fold[by_id[i]] == 1}
    else:
        assert test_ids == {i for i in plan.image_id if plan.split[by_id[i]] == "test"}
        assert {kept[i].image_id for i in s["val"]} == {i for i in plan.image_id if plan.split[by_id[i]] == "val"}
    pats = {k: {kept[i].patient_id for i in v} for k, v in s.items()}
    assert not pats["train"] & pats["val"] and not pats["train"] & pats["test"] and not pats["val"] & pats["test"]
    assert sorted(np.concatenate(list(s.values()))) == list(range(len(kept))) and len(targets) == len(kept)
