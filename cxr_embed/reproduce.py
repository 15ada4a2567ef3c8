"""``cxr-embed reproduce``: the study's protocol on ChestX-ray14 in one resumable command.

A user with ChestX-ray14 and the weights should not have to assemble the study's checks by hand.
This chains the library's own stages (nothing is re-implemented here) into ``OUT``:

1. ``index``: the store ``OUT/store`` (reused when it is already there; the index job resumes);
2. ``svm_cv``: the SVM with 5 patient-grouped folds on a stratified sample (the seed's first
   check: ROC-AUC 0.82-0.83; the study's 0.8277 / Brier 0.168);
3. ``holdout``: the frozen SVM and the zero-shot classifier on one patient-disjoint hold-out plan;
4. ``sweep``: the fine-tuning lr x weight-decay grid on that plan, selected on validation only,
   the chosen cell tested once (second check: the study's 0.888 / Brier 0.137);
5. ``study``: both arms on the same hold-out test rows, calibration included (third check);
6. ``search_eval``: retrieval quality on the same plan (test rows against training rows);
7. ``report``: ``OUT/report.md`` with each measured figure beside the published one, and the PNGs
   in ``OUT/figures``.

Why resumable step by step: the full protocol is days of CPU (hours on a GPU); each finished step's
summary goes to ``OUT/reproduce.json`` and a rerun skips it, while the steps themselves resume
(the index job and the sweep cells keep their own progress).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cxr_embed.atomicio import write_bytes_atomic, write_json_atomic, write_text_atomic
from cxr_embed.errors import ConfigError
from cxr_embed.reproduce_report import PUBLISHED, comparison_rows, render

STATE_FILE = "reproduce.json"
STEPS = ("index", "svm_cv", "holdout", "sweep", "study", "search_eval", "report")
Log = Callable[[str], None]


@dataclass
class ReproduceConfig:
    """Options of ``cxr-embed reproduce`` (the protocol's defaults are the study's)."""

    data: str
    out: str
    model_dir: str | None = None
    sample: int = 10_000
    lrs: tuple[float, ...] = (1e-4, 1e-5, 1e-6)
    weight_decays: tuple[float, ...] = (0.1, 0.2, 0.3)
    epochs: int = 10
    batch_size: int = 48
    test_fraction: float = 0.2
    ks: tuple[int, ...] = (1, 5, 10)
    n_boot: int = 1000
    seed: int = 0
    device: str = "auto"
    progress: bool = False

    def protocol(self) -> dict[str, Any]:
        """The settings that decide the results: a rerun with other ones must use another folder."""
        out = asdict(self)
        for runtime in ("out", "progress", "device", "data", "model_dir"):
            out.pop(runtime)
        return out


@dataclass
class ReproduceResult:
    out: str
    steps: dict[str, dict[str, Any]]
    skipped: list[str] = field(default_factory=list)  # steps finished by an earlier run
    report: str | None = None
    comparison: list[dict[str, Any]] = field(default_factory=list)


def count_images(data: str | Path) -> int:
    """Images listed in ChestX-ray14's ``Data_Entry_2017*.csv`` (ConfigError when it is not that layout)."""
    data = Path(data)
    entries = sorted(data.glob("Data_Entry_2017*.csv"))
    if not entries:
        raise ConfigError(
            f"{data} has no Data_Entry_2017*.csv: point reproduce at the ChestX-ray14 folder "
            "(Data_Entry_2017_v2020.csv, images_*/images/*.png, train_val_list.txt, test_list.txt)."
        )
    with entries[0].open(encoding="utf-8") as f:
        return max(sum(1 for _ in f) - 1, 0)


def seconds_per_image(model_dir: str | Path | None, device: str, batch: int = 4) -> float:
    """Measured forward time per image of the chosen model on this machine (one warm-up, one timed batch)."""
    import torch

    from cxr_embed.model import MedImageInsight

    model = MedImageInsight.load(model_dir, device=device)
    size = model.preprocessor.image_size
    x = torch.rand(batch, 3, size, size)
    model.encode_images(x)
    t0 = time.perf_counter()
    model.encode_images(x)
    return (time.perf_counter() - t0) / batch


def estimate(
    config: ReproduceConfig, n_images: int, per_image: float, store_exists: bool
) -> dict[str, float]:
    """Seconds per step, extrapolated from one forward pass (backward ~ 2 forwards). An estimate: it
    ignores image decoding and leaves out classification, the study and search eval (minutes)."""
    n_plan = min(config.sample, n_images)
    n_train, n_val, n_test = 0.7 * n_plan, 0.1 * n_plan, config.test_fraction * n_plan
    cells = len(config.lrs) * len(config.weight_decays)
    return {
        "index": 0.0 if store_exists else n_images * per_image,
        "sweep": cells * config.epochs * (3 * n_train + n_val) * per_image + n_test * per_image,
    }


def plan_lines(config: ReproduceConfig, n_images: int) -> list[str]:
    """The protocol in words (``--dry-run``)."""
    n_plan = min(config.sample, n_images)
    store = Path(config.out) / "store"
    grid = f"lr {', '.join(f'{v:g}' for v in config.lrs)} x weight decay {', '.join(f'{v:g}' for v in config.weight_decays)}"
    return [
        f"1. index   {n_images:,} images of {config.data} into {store}"
        + (" (store exists: reused, the job resumes)" if (store / "store.json").is_file() else ""),
        f"2. svm_cv  SVM, 5 patient-grouped folds, stratified sample of {n_plan:,} images "
        f"(published: {PUBLISHED['svm_cv_roc_auc']})",
        f"3. holdout SVM + zero-shot on a hold-out plan ({config.test_fraction:g} of patients as test, "
        f"{n_plan:,} images)",
        f"4. sweep   fine-tune {grid}, {config.epochs} epoch(s), batch {config.batch_size}; select on "
        f"validation, test once (published: {PUBLISHED['finetuned_roc_auc']} / Brier {PUBLISHED['finetuned_brier']})",
        "5. study   both arms on the same hold-out test rows (ROC-AUC, Brier, ECE, DeLong, patient-clustered CIs)",
        f"6. search  search eval on the plan, k {','.join(map(str, config.ks))}, every finding",
        f"7. report  {Path(config.out) / 'report.md'} and {Path(config.out) / 'figures'}/*.png",
    ]


# ------------------------------------------------------------------------------------------ steps


class _Run:
    """The state shared by the steps: the folder, the store, the plan, and ``reproduce.json``."""

    def __init__(self, config: ReproduceConfig):
        self.config = config
        self.out = Path(config.out)
        self.store_dir = self.out / "store"
        self.state_path = self.out / STATE_FILE
        # through JSON once, so the comparison with a saved run sees lists where the config has tuples
        self.state: dict[str, Any] = {"protocol": json.loads(json.dumps(config.protocol())), "steps": {}}

    def load(self) -> None:
        if not self.state_path.is_file():
            return
        saved = json.loads(self.state_path.read_text(encoding="utf-8"))
        if saved.get("protocol") != self.state["protocol"]:
            raise ConfigError(
                f"{self.out} holds a reproduce run with other settings ({saved.get('protocol')}); use another --out "
                "or the same options to resume it."
            )
        self.state = saved

    def save(self) -> None:
        write_json_atomic(self.state, self.state_path)

    def store(self):
        from cxr_embed.store import Store

        return Store.open(self.store_dir)

    def sample(self, store) -> int | None:
        """The plan's sample: None when the store has no more rows than asked (the plan takes them all)."""
        return self.config.sample if self.config.sample < len(store) else None

    @property
    def plan_id(self) -> str:
        return self.state["steps"]["holdout"]["plan_id"]


def _index(run: _Run) -> dict[str, Any]:
    from cxr_embed.job import run_index
    from cxr_embed.pipeline import IndexConfig

    c = run.config
    reused = (run.store_dir / "store.json").is_file()
    run_index(
        c.data,
        run.store_dir,
        IndexConfig(dataset="chestxray14", model_dir=c.model_dir, device=c.device),
        progress=c.progress,
    )
    store = run.store()
    return {
        "rows": len(store),
        "errors": store.errors().num_rows,
        "model_id": store.model_id,
        "reused": reused,
    }


def _summary(result) -> dict[str, Any]:
    v = result.pooled.values
    return {
        "roc_auc": v["roc_auc"],
        "roc_auc_ci": list(result.pooled.auc_ci),
        "brier": v["brier"],
        "brier_ci": list(result.pooled.cis.get("brier", (None, None))),
        "ece": v["ece"],
        "n": int(v["n"]),
    }


def _svm_cv(run: _Run) -> dict[str, Any]:
    from cxr_embed.evaluation import ClassifyConfig, classify_store

    c, store = run.config, run.store()
    done = classify_store(
        store,
        ClassifyConfig(
            models=("svm",),
            folds=5,
            sample=run.sample(store),
            seed=c.seed,
            n_boot=c.n_boot,
            refit=False,
            progress=c.progress,
        ),
    )
    return {
        "run_id": done.run_id,
        "plan_id": done.plan_id,
        **_summary(done.results[0]),
        "figures": done.plots,
    }


def _holdout(run: _Run) -> dict[str, Any]:
    from cxr_embed.evaluation import ClassifyConfig, classify_store

    c, store = run.config, run.store()
    done = classify_store(
        store,
        ClassifyConfig(
            models=("svm", "zeroshot"),
            split="holdout",
            test_fraction=c.test_fraction,
            sample=run.sample(store),
            seed=c.seed,
            n_boot=c.n_boot,
            refit=False,
            plots=False,
            progress=c.progress,
            model_dir=c.model_dir,
            device=c.device,
        ),
    )
    by_name = {r.classifier: _summary(r) for r in done.results}
    prompts = {t: {s.prompt: s.roc_auc for s in rows} for t, rows in done.prompt_reports.items()}
    return {
        "run_id": done.run_id,
        "plan_id": done.plan_id,
        "plan": done.plan,
        "svm": by_name["svm"],
        "zeroshot": by_name["zeroshot"],
        "prompts": prompts,
    }


def _sweep(run: _Run) -> dict[str, Any]:
    from cxr_embed.finetune import FineTuneConfig
    from cxr_embed.finetune.sweep import run_sweep

    c = run.config
    config = FineTuneConfig(
        source=c.data,
        out=str(run.out / "finetune"),
        dataset="chestxray14",
        model_dir=c.model_dir,
        epochs=c.epochs,
        batch_size=c.batch_size,
        store=str(run.store_dir),
        seed=c.seed,
        n_boot=c.n_boot,
        plan=run.plan_id,
        device=c.device,
    )
    swept = run_sweep(config, list(c.lrs), list(c.weight_decays), progress=c.progress)
    if swept.selected is None:
        raise ConfigError(
            f"The fine-tuning sweep was interrupted; rerun `cxr-embed reproduce` with --out {c.out}."
        )
    cells = [
        {
            "lr": x.lr,
            "weight_decay": x.weight_decay,
            "status": x.status,
            "val_roc_auc": x.val_roc_auc,
            "val_brier": x.val_brier,
            "selected": x.selected,
        }
        for x in swept.cells
    ]
    return {
        "sweep_id": swept.sweep_id,
        "cells": cells,
        "selected": {"lr": swept.selected.lr, "weight_decay": swept.selected.weight_decay},
        "warnings": swept.warnings,
    }


def _study(run: _Run) -> dict[str, Any]:
    from cxr_embed.study import StudyConfig, run_study

    c = run.config
    result = run_study(run.store(), StudyConfig(plan_id=run.plan_id, n_boot=c.n_boot, seed=c.seed))
    return {
        "study_id": result.study_id,
        "n_images": result.n_images,
        "n_patients": result.n_patients,
        "reference": result.reference,
        "table": result.table(),
        "figures": result.figures,
        "notes": result.notes,
    }


def _search_eval(run: _Run) -> dict[str, Any]:
    from cxr_embed.retrieval_eval import RetrievalEvalConfig, evaluate_and_record

    c = run.config
    done = evaluate_and_record(
        run.store(),
        RetrievalEvalConfig(ks=c.ks, label="all-findings", plan_id=run.plan_id, n_boot=c.n_boot, seed=c.seed),
    )
    rows = [asdict(r) for r in done.report.rows]
    return {"run_id": done.run_id, "figure": done.figure, "rows": rows, "params": done.report.params}


def _report(run: _Run) -> dict[str, Any]:
    steps = run.state["steps"]
    figures = run.out / "figures"
    copied = []
    for src in _figures(steps):
        dst = figures / f"{Path(src).parent.name}-{Path(src).name}"
        write_bytes_atomic(Path(src).read_bytes(), dst)
        copied.append(str(dst.relative_to(run.out)))
    path = write_text_atomic(render(run.config, steps, copied), run.out / "report.md")
    return {"report": str(path), "figures": copied, "comparison": comparison_rows(steps)}


def _figures(steps: dict[str, Any]) -> list[str]:
    out = [*steps["svm_cv"].get("figures", []), *steps["study"].get("figures", [])]
    if steps["search_eval"].get("figure"):
        out.append(steps["search_eval"]["figure"])
    return [p for p in out if Path(p).is_file()]


_STEP_FUNCTIONS: dict[str, Callable[[_Run], dict[str, Any]]] = {
    "index": _index,
    "svm_cv": _svm_cv,
    "holdout": _holdout,
    "sweep": _sweep,
    "study": _study,
    "search_eval": _search_eval,
    "report": _report,
}


def run_reproduce(config: ReproduceConfig, log: Log | None = None) -> ReproduceResult:
    """Run every step not yet finished in ``config.out`` (see the module docstring)."""
    say = log or (lambda _msg: None)
    count_images(config.data)  # the layout check, before anything is written
    run = _Run(config)
    run.out.mkdir(parents=True, exist_ok=True)
    run.load()
    skipped = []
    for i, name in enumerate(STEPS, 1):
        if name in run.state["steps"] and name != "report":
            skipped.append(name)
            say(f"[{i}/{len(STEPS)}] {name}: done in an earlier run, skipped")
            continue
        say(f"[{i}/{len(STEPS)}] {name}")
        t0 = time.perf_counter()
        result = _STEP_FUNCTIONS[name](run)
        run.state["steps"][name] = {**result, "seconds": round(time.perf_counter() - t0, 2)}
        run.save()
    steps = run.state["steps"]
    return ReproduceResult(
        str(run.out), steps, skipped, steps["report"]["report"], steps["report"]["comparison"]
    )
