"""Learning-rate × weight-decay sweep: select on validation only, test the chosen cell once.

The seed's second check (lr 1e-4/1e-5/1e-6 × weight decay 0.1/0.2/0.3) is only honest if the test
rows play no part in the choice. Each cell trains with ``evaluate_test`` off (its result holds
validation metrics only); the cell with the best validation ROC-AUC (ties: lower validation Brier)
is then resumed once with ``evaluate_test`` on, which scores the test rows and exports the model.
Cells live in ``OUT/lr<lr>-wd<wd>``; a rerun skips finished cells and resumes an interrupted one,
and never re-tests a cell that was already tested. The ``sweep`` table (store, or ``OUT/results``)
gets one row per cell.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from cxr_embed.errors import ConfigError
from cxr_embed.finetune.config import FineTuneConfig, FineTuneResult, resume_config
from cxr_embed.finetune.runner import finetune
from cxr_embed.schema import RESULT_SCHEMAS

FINISHED = ("completed", "early_stopped", "max_steps")


def parse_values(text: str, option: str) -> list[float]:
    """``"1e-4,1e-5"`` → ``[1e-4, 1e-5]`` (a ConfigError naming the option otherwise)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(
            f"{option} takes a number or a comma-separated list, e.g. 1e-4,1e-5 (got {text!r})."
        ) from None
    if not values:
        raise ConfigError(f"{option} needs at least one value.")
    return values


@dataclass
class SweepCell:
    lr: float
    weight_decay: float
    out: Path
    status: str = "pending"
    run_id: str | None = None
    val_roc_auc: float | None = None
    val_brier: float | None = None
    selected: bool = False


@dataclass
class SweepResult:
    sweep_id: str
    cells: list[SweepCell]
    selected: SweepCell | None
    test: FineTuneResult | None  # the selected cell's test evaluation (None when interrupted)
    warnings: list[str] = field(default_factory=list)


def cell_dir(out: Path, lr: float, weight_decay: float) -> Path:
    return out / f"lr{lr:g}-wd{weight_decay:g}"


def _read_result(path: Path) -> dict[str, Any] | None:
    f = path / "result.json"
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None


def _run_cell(config: FineTuneConfig, cell: SweepCell, progress: bool) -> None:
    """Train one cell (validation only) unless it already finished; fill its validation metrics."""
    saved = _read_result(cell.out)
    if saved is None or saved["status"] not in FINISHED:
        cfg = dataclasses.replace(
            config, out=str(cell.out), lr=cell.lr, weight_decay=cell.weight_decay, evaluate_test=False
        )
        resume = (cell.out / "config.json").is_file()
        result = finetune(resume_config(cell.out, {}) if resume else cfg, resume=resume, progress=progress)
        if result.status == "interrupted":
            cell.status = "interrupted"
            return
        saved = _read_result(cell.out)
    first = next(iter(saved["val_metrics"].values()), {})
    cell.status, cell.run_id = saved["status"], saved["run_id"]
    cell.val_roc_auc, cell.val_brier = first.get("roc_auc"), first.get("brier")


def _key(cell: SweepCell) -> tuple[float, float]:
    auc = cell.val_roc_auc if cell.val_roc_auc == cell.val_roc_auc and cell.val_roc_auc is not None else -1.0
    return auc, -(cell.val_brier if cell.val_brier is not None else 1.0)


def sweep_table(sweep_id: str, plan_id: str | None, cells: list[SweepCell]) -> pa.Table:
    now = datetime.now(timezone.utc)
    return pa.Table.from_pylist(
        [
            {
                "sweep_id": sweep_id,
                "created_at": now,
                "plan_id": plan_id,
                "lr": c.lr,
                "weight_decay": c.weight_decay,
                "run_id": c.run_id,
                "status": c.status,
                "val_roc_auc": c.val_roc_auc,
                "val_brier": c.val_brier,
                "selected": c.selected,
                "out": str(c.out),
            }
            for c in cells
        ],
        schema=RESULT_SCHEMAS["sweep"],
    )


def run_sweep(
    config: FineTuneConfig, lrs: list[float], weight_decays: list[float], *, progress: bool = True
) -> SweepResult:
    """Train every (lr, weight decay) cell on validation, then test the selected cell once."""
    from cxr_embed.finetune.runner import _plan_folds, _resolve_plan
    from cxr_embed.results import FolderResults

    config.validate()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    config = _resolve_plan(config)  # every cell on the same plan (made once)
    if _plan_folds(config):
        raise ConfigError(
            "A sweep selects on one validation split; use --split holdout or official with "
            "--lr/--weight-decay lists (K folds would train every cell once per fold)."
        )
    cells = [SweepCell(lr, wd, cell_dir(out, lr, wd)) for lr in lrs for wd in weight_decays]
    for cell in cells:
        _run_cell(config, cell, progress)
        if cell.status == "interrupted":
            return SweepResult("", cells, None, None)
    best = max(cells, key=_key)
    best.selected = True
    saved = _read_result(best.out)
    if saved and saved.get("test_metrics"):  # tested before: the test rows are not touched again
        test = None
    else:
        test = finetune(resume_config(best.out, {"evaluate_test": True}), resume=True, progress=progress)
    sweep_id = f"sweep-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"
    table = sweep_table(sweep_id, config.plan, cells)
    FolderResults(out).write_results("sweep", table)
    if config.store:
        from cxr_embed.store import Store

        Store.open(config.store).write_results("sweep", table)
    return SweepResult(sweep_id, cells, best, test, list(test.warnings) if test else [])
