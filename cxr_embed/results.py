"""The result tables (predictions, metrics, runs) and their one writer, shared by classify, finetune
and study.

Every row carries the ``plan_id`` of the evaluation plan it was computed on, so a comparison can
check it is made on the same rows. Subgroup results are ordinary ``metrics`` rows with the
``subgroup``/``level`` columns set (``('sex', 'F')``), never packed into the metric name. The
writes go through the store's ``write_results`` (one atomic, fsynced Parquet part per call); a
fine-tuning run without a store writes the same layout into its own folder (:class:`FolderResults`).
"""

from __future__ import annotations

import json
import platform
import secrets
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cxr_embed import metrics
from cxr_embed.atomicio import write_parquet_atomic
from cxr_embed.schema import RESULT_SCHEMAS


def new_run_id(kind: str) -> str:
    """Sortable, unique run id: ``<kind>-YYYYmmddTHHMMSS-<hex>``."""
    return f"{kind}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def versions() -> dict[str, str]:
    """Library versions recorded with every run (reproducibility)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("cxr-embed", "numpy", "scikit-learn", "torch", "faiss-cpu", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def _run_columns(n: int, run_id: str, plan_id: str | None, arm: str, classifier: str, target: str) -> dict:
    """The columns that say which run, plan, arm, classifier and target ``n`` result rows belong to."""
    return {"run_id": [run_id] * n, "plan_id": [plan_id] * n, "arm": [arm] * n, "classifier": [classifier] * n,
            "target": [target] * n}


def predictions_table(
    run_id: str,
    arm: str,
    classifier: str,
    target: str,
    fold,
    row_id,
    image_id,
    prob,
    label,
    *,
    plan_id: str | None = None,
    prob_raw=None,
) -> pa.Table:
    """Rows of the ``predictions`` table (``row_id`` may be None when the row is not in a store)."""
    n = len(prob)
    return pa.Table.from_pydict(
        {
            **_run_columns(n, run_id, plan_id, arm, classifier, target),
            "fold": np.asarray(fold, dtype=np.int32),
            "row_id": pa.array(row_id, pa.int64()) if row_id is not None else pa.nulls(n, pa.int64()),
            "image_id": pa.array(image_id, pa.string()),
            "probability": np.asarray(prob, dtype=np.float64),
            "probability_raw": np.asarray(prob if prob_raw is None else prob_raw, dtype=np.float64),
            "label": np.asarray(label, dtype=np.int8),
        },
        schema=RESULT_SCHEMAS["predictions"],
    )


def metrics_table(
    run_id: str,
    arm: str,
    classifier: str,
    target: str,
    fold: int,
    result: metrics.BinaryMetrics | list,
    *,
    plan_id: str | None = None,
    subgroup: str | None = None,
    level: str | None = None,
) -> pa.Table:
    """Rows of the ``metrics`` table from a :class:`BinaryMetrics` (or ``(metric, value, lo, hi)`` rows)."""
    rows = result.rows() if isinstance(result, metrics.BinaryMetrics) else list(result)
    n = len(rows)
    return pa.Table.from_pydict(
        {
            **_run_columns(n, run_id, plan_id, arm, classifier, target),
            "fold": pa.array([fold] * n, pa.int32()),
            "subgroup": [subgroup] * n,
            "level": [level] * n,
            "metric": [r[0] for r in rows],
            "value": pa.array([r[1] for r in rows], pa.float64()),
            "ci_low": pa.array([r[2] for r in rows], pa.float64()),
            "ci_high": pa.array([r[3] for r in rows], pa.float64()),
        },
        schema=RESULT_SCHEMAS["metrics"],
    )


SUBGROUP_METRICS = ("n", "prevalence", "roc_auc", "brier", "sensitivity@sens90", "specificity@sens90")


def subgroup_metrics_tables(
    run_id: str, arm: str, subgroups: Sequence[dict[str, Any]], *, plan_id: str | None = None
) -> list[pa.Table]:
    """Subgroup rows (see ``crossval.subgroup_table``) as pooled ``metrics`` rows with subgroup/level set."""
    out = []
    for s in subgroups:
        rows = [
            (k, float(s[k]), *(s.get("roc_auc_ci", (None, None)) if k == "roc_auc" else (None, None)))
            for k in SUBGROUP_METRICS
            if k in s
        ]
        out.append(
            metrics_table(
                run_id,
                arm,
                s["classifier"],
                s["target"],
                -1,
                rows,
                plan_id=plan_id,
                subgroup=s["attribute"],
                level=s["group"],
            )
        )
    return out


def runs_table(run_id: str, kind: str, params: dict, timings: dict, warnings: Sequence[str] = ()) -> pa.Table:
    return pa.Table.from_pydict(
        {
            "run_id": [run_id],
            "kind": [kind],
            "created_at": [datetime.now(timezone.utc)],
            "params": [json.dumps(params, default=str)],
            "versions": [json.dumps(versions())],
            "timings": [json.dumps(timings)],
            "warnings": [json.dumps(list(warnings))],
        },
        schema=RESULT_SCHEMAS["runs"],
    )


def write_results(
    store,
    run_id: str,
    kind: str,
    params: dict,
    timings: dict,
    predictions: Sequence[pa.Table],
    metric_tables: Sequence[pa.Table],
    warnings: Sequence[str] = (),
) -> None:
    """Append one run (its predictions, metrics and the ``runs`` row) to ``store``'s result tables.

    ``store`` is a :class:`cxr_embed.store.Store` or a :class:`FolderResults`; classify, finetune
    and the sweep all write through here.
    """
    if predictions:
        store.write_results("predictions", pa.concat_tables(predictions))
    if metric_tables:
        store.write_results("metrics", pa.concat_tables(metric_tables))
    store.write_results("runs", runs_table(run_id, kind, params, timings, warnings))


class FolderResults:
    """The ``results/<table>/part-*.parquet`` layout of a store, written into a run's own folder.

    It has the one method :func:`write_results` needs, so a fine-tuning run's tables are written by
    the same code (same schemas, same atomic writer) whether or not a store is given.
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def write_results(self, table: str, data: pa.Table) -> Path:
        from cxr_embed.store import RESULTS_DIR, conform

        data = conform(data, RESULT_SCHEMAS[table], f"results/{table}")
        return write_parquet_atomic(
            data, self.root / RESULTS_DIR / table / f"part-{time.time_ns():020d}.parquet"
        )
