"""``cxr-embed study``: the frozen-embedding classifiers against the fine-tuned model on the same rows.

The study's headline table is only worth publishing when every arm was scored on exactly the same
images, with uncertainty at the level of the patient. So this module:

* takes each arm's latest predictions on one stored plan (``latest_predictions``), and refuses
  to compare arms whose image sets differ (another plan, an unfinished K-fold fine-tune, a
  ``--finetune-run`` made on other rows), saying why;
* scores every arm with the same code: ROC-AUC, accuracy/F1 at 0.5, sensitivity/specificity at
  the operating points each run chose on its own training-side rows (stored as ``threshold@*``
  metrics, applied per fold), Brier and ECE, each with a patient-clustered bootstrap 95 % CI;
* compares each arm with a reference arm (default: the best frozen classifier) on the paired rows:
  ROC-AUC difference with DeLong's p-value and its patient-clustered bootstrap CI, Brier
  difference likewise;
* draws one ROC figure (operating points marked, n in the legend) and one reliability figure
  (reference and fine-tuned arm overlaid), and appends everything to the ``studies`` table (the
  ``study`` view shows the latest).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxr_embed import metrics, stats
from cxr_embed.errors import EvaluationError
from cxr_embed.plans import PlanSettings, group_ids, load_plan, make_plan, plan_ids
from cxr_embed.progress import progress_bar
from cxr_embed.schema import RESULT_SCHEMAS

FROZEN, FINETUNED = "frozen", "finetuned"
OPERATING_POINTS = ("youden", "sens90")
STUDY_METRICS = (
    "roc_auc",
    "accuracy",
    "f1",
    *(f"{m}@{o}" for o in OPERATING_POINTS for m in ("sensitivity", "specificity")),
    "brier",
    "ece",
)


@dataclass
class StudyConfig:
    """Options of ``cxr-embed study``."""

    plan_id: str | None = None  # default: --finetune-run's plan, else the plan with the most arms
    models: tuple[str, ...] | None = None  # frozen classifiers to include (default: all on the plan)
    finetune_run: str | None = None  # this fine-tuning run instead of the plan's latest one
    target: str = "abnormal"
    reference: str | None = None  # "arm/classifier"; default: the frozen classifier with the best ROC-AUC
    n_boot: int = 1000
    seed: int = 0
    plots: bool = True
    progress: bool = False  # a bar on stderr over the bootstrap of each arm and comparison
    settings: PlanSettings | None = None  # --split/--where/--sample: the plan they make (instead of --plan)


@dataclass
class Arm:
    """One arm's predictions on the study rows (aligned to the study's image order)."""

    arm: str
    classifier: str
    run_id: str
    prob: np.ndarray
    fold: np.ndarray
    thresholds: dict[int, dict[str, float]]  # fold -> operating point -> threshold
    values: dict[str, float] = field(default_factory=dict)
    cis: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.arm}/{self.classifier}"

    def decisions(self) -> dict[str, np.ndarray]:
        """Calls at each operating point, every row at its own fold's threshold."""
        out = {}
        for op in OPERATING_POINTS:
            thr = np.array([self.thresholds.get(int(f), {}).get(op, np.nan) for f in self.fold])
            if not np.isnan(thr).any():
                out[op] = self.prob >= thr
        return out


@dataclass
class Comparison:
    """``arm - reference`` on the paired rows."""

    arm: str
    reference: str
    auc_diff: float
    auc_diff_ci: tuple[float, float]
    delong_p: float
    brier_diff: float
    brier_diff_ci: tuple[float, float]


@dataclass
class StudyResult:
    study_id: str
    plan_id: str
    target: str
    n_images: int
    n_patients: int
    prevalence: float
    arms: list[Arm]
    reference: str
    comparisons: list[Comparison]
    plan: str = ""  # the plan, in words
    figures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # arms with predictions only on other plans (not compared)

    def table(self) -> list[dict[str, Any]]:
        """One row per arm: the metrics with their CIs and, for a compared arm, the paired test."""
        by_arm = {c.arm: c for c in self.comparisons}
        rows = []
        for a in self.arms:
            row: dict[str, Any] = {"arm": a.arm, "classifier": a.classifier, "n": self.n_images}
            for m in (
                "roc_auc",
                "accuracy",
                "f1",
                "sensitivity@sens90",
                "specificity@sens90",
                "brier",
                "ece",
            ):
                row[m] = a.values.get(m)
                row[f"{m}_ci"] = a.cis.get(m)
            c = by_arm.get(a.name)
            row["auc_diff_vs_ref"] = None if c is None else c.auc_diff
            row["auc_diff_ci"] = None if c is None else c.auc_diff_ci
            row["delong_p"] = None if c is None else c.delong_p
            row["brier_diff_vs_ref"] = None if c is None else c.brier_diff
            row["brier_diff_ci"] = None if c is None else c.brier_diff_ci
            rows.append(row)
        return rows


# --------------------------------------------------------------------------------------- loading


def _default_plan(con, target: str) -> str:
    rows = con.execute(
        "SELECT p.plan_id, count(DISTINCT p.arm) AS arms, max(r.created_at) AS last FROM latest_predictions p "
        "JOIN runs r USING (run_id) WHERE p.target = ? AND p.plan_id IS NOT NULL GROUP BY p.plan_id "
        "ORDER BY arms DESC, last DESC",
        [target],
    ).fetchall()
    if not rows:
        raise EvaluationError(
            f"No predictions for {target!r} on a stored plan yet: run `cxr-embed classify` "
            "(and `cxr-embed finetune --store ...`) first."
        )
    return rows[0][0]


def _settings_plan(store, settings: PlanSettings | None) -> str | None:
    """``study --split/--where/--sample``: the stored plan those options make (classify/finetune made it)."""
    if settings is None:
        return None
    plan = make_plan(store, settings)
    if plan.plan_id not in plan_ids(store):
        raise EvaluationError(f"No run was evaluated on the plan these options make ({plan.describe()}): run "
                              "`cxr-embed classify` (and `finetune --store`) with the same options first.")
    return plan.plan_id


def _run_plan(con, run_id: str | None) -> str | None:
    """The plan a named (fine-tuning) run was evaluated on: the study's default plan then."""
    if not run_id:
        return None
    rows = con.execute("SELECT any_value(plan_id) FROM predictions WHERE run_id = ?", [run_id]).fetchall()
    return rows[0][0] if rows else None


def _predictions(con, plan_id: str, config: StudyConfig) -> pa.Table:
    """The plan's latest predictions per arm/classifier (or the named fine-tuning run's)."""
    cols = "arm, classifier, run_id, plan_id, fold, image_id, probability, label"
    sql = f"SELECT {cols} FROM latest_predictions WHERE plan_id = $plan AND target = $target"
    params: dict[str, Any] = {"plan": plan_id, "target": config.target}
    if config.finetune_run:
        sql = (
            f"SELECT {cols} FROM latest_predictions WHERE plan_id = $plan AND target = $target AND arm <> "
            f"'{FINETUNED}' UNION ALL SELECT {cols} FROM predictions WHERE run_id = $run AND target = $target"
        )
        params["run"] = config.finetune_run
    table = con.sql(sql, params=params).to_arrow_table()
    if config.finetune_run:
        runs = table.filter(pc.equal(table.column("run_id"), config.finetune_run))
        if runs.num_rows == 0:
            raise EvaluationError(
                f"Fine-tuning run {config.finetune_run!r} has no {config.target!r} predictions "
                "in this store (was it run with --store?)."
            )
        other = set(runs.column("plan_id").to_pylist()) - {plan_id}
        if other:
            raise EvaluationError(
                f"Fine-tuning run {config.finetune_run} was evaluated on plan {sorted(map(str, other))[0]}, the frozen "
                f"arm on plan {plan_id}: their test rows differ, so they cannot be compared. Run `cxr-embed "
                f"classify --plan {sorted(map(str, other))[0]}` or fine-tune with --plan {plan_id}."
            )
    return table


def _thresholds(con, run_ids: list[str], target: str) -> dict[tuple[str, str], dict[int, dict[str, float]]]:
    rows = con.execute(
        "SELECT run_id, classifier, fold, metric, value FROM metrics WHERE run_id IN (SELECT unnest($runs)) "
        "AND target = $target AND fold >= 0 AND subgroup IS NULL AND metric LIKE 'threshold@%'",
        {"runs": run_ids, "target": target},
    ).fetchall()
    out: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    for run_id, classifier, fold, metric, value in rows:
        out.setdefault((run_id, classifier), {}).setdefault(int(fold), {})[metric.split("@", 1)[1]] = value
    return out


def _arms(table: pa.Table, thresholds, config: StudyConfig) -> tuple[list[Arm], np.ndarray, np.ndarray]:
    """Group predictions into arms aligned on one image order; refuse arms with other rows."""
    rows = table.to_pylist()
    keyed: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        if r["arm"] == FROZEN and config.models and r["classifier"] not in config.models:
            continue
        keyed.setdefault((r["arm"], r["classifier"]), {})[r["image_id"]] = r
    if not keyed:
        raise EvaluationError("No arm has predictions on this plan for the chosen classifiers.")
    sets = {k: frozenset(v) for k, v in keyed.items()}
    reference_set = max(sets.values(), key=len)
    differing = {k: s for k, s in sets.items() if s != reference_set}
    if differing:
        detail = "; ".join(
            f"{a}/{c}: {len(s)} images ({len(s - reference_set)} not in, "
            f"{len(reference_set - s)} missing from the others)"
            for (a, c), s in differing.items()
        )
        raise EvaluationError(
            f"The arms were not scored on the same images ({len(reference_set)} for the others; {detail}). A "
            "comparison on different rows is refused: rerun the arm on the same plan (--plan), or finish its "
            "K-fold fine-tune."
        )
    images = np.array(sorted(reference_set), dtype=object)
    first = next(iter(keyed.values()))
    labels = np.array([first[i]["label"] for i in images], dtype=np.int64)
    arms = []
    for (arm, classifier), by_image in sorted(keyed.items()):
        ordered = [by_image[i] for i in images]
        run_id = ordered[0]["run_id"]
        arms.append(
            Arm(
                arm,
                classifier,
                run_id,
                np.array([r["probability"] for r in ordered], dtype=np.float64),
                np.array([r["fold"] for r in ordered], dtype=np.int64),
                thresholds.get((run_id, classifier), {}),
            )
        )
    return arms, images, labels


# --------------------------------------------------------------------------------------- scoring


def score_arm(arm: Arm, y: np.ndarray, clusters: np.ndarray, n_boot: int, seed: int) -> None:
    """Fill ``arm.values``/``arm.cis``: the study's metrics, CIs by patient-clustered bootstrap."""
    calls = arm.decisions()
    values = metrics.binary_report(y, arm.prob)
    for op, pred in calls.items():
        values.update({f"{k}@{op}": v for k, v in metrics.decision_metrics(y, pred).items()})
    arm.values = values
    arm.cis = stats.bootstrap_cis(y, arm.prob, clusters=clusters, decisions=calls, n_boot=n_boot, seed=seed)


def compare(arm: Arm, ref: Arm, y: np.ndarray, clusters: np.ndarray, n_boot: int, seed: int) -> Comparison:
    """Paired ``arm - ref``: DeLong p-value and clustered bootstrap CIs of the AUC and Brier differences."""
    test = stats.delong_paired(y, arm.prob, ref.prob)
    cis = stats.paired_diff_cis(y, arm.prob, ref.prob, clusters=clusters, n_boot=n_boot, seed=seed)
    return Comparison(
        arm.name,
        ref.name,
        test.diff,
        cis["roc_auc"],
        test.p_value,
        metrics.brier(y, arm.prob) - metrics.brier(y, ref.prob),
        cis["brier"],
    )


def _left_out(con, plan_id: str, target: str, arms: list[Arm]) -> list[str]:
    """Say which arms were scored only on other plans, so a missing fine-tuned arm is never silent."""
    shown = {(a.arm, a.classifier) for a in arms}
    rows = con.execute(
        "SELECT arm, classifier, string_agg(DISTINCT plan_id, ', ') FROM latest_predictions "
        "WHERE target = ? AND plan_id <> ? GROUP BY arm, classifier ORDER BY arm, classifier",
        [target, plan_id],
    ).fetchall()
    return [
        f"{arm}/{classifier} was scored on plan(s) {plans} only, not on {plan_id}: its rows differ, so it is not "
        f"compared. Rerun it with --plan {plan_id} (or study --plan one of those)."
        for arm, classifier, plans in rows
        if (arm, classifier) not in shown
    ]


def _reference(arms: list[Arm], name: str | None) -> Arm:
    if name:
        match = [a for a in arms if a.name == name or a.classifier == name]
        if not match:
            raise EvaluationError(f"No arm {name!r} in the study; arms: {', '.join(a.name for a in arms)}.")
        return match[0]
    frozen = [a for a in arms if a.arm == FROZEN] or arms
    return max(frozen, key=lambda a: np.nan_to_num(a.values["roc_auc"], nan=-1.0))


def run_study(store, config: StudyConfig | None = None) -> StudyResult:
    """Score every arm of one plan on the same rows, compare with the reference, write ``studies``."""
    config = config or StudyConfig()
    con = store.connect()
    plan_id = (config.plan_id or _settings_plan(store, config.settings) or _run_plan(con, config.finetune_run)
               or _default_plan(con, config.target))
    plan = load_plan(store, plan_id)  # an unknown id fails here, listing the known plans
    table = _predictions(con, plan_id, config)
    if table.num_rows == 0:
        raise EvaluationError(
            f"No {config.target!r} predictions on plan {plan_id}: run `cxr-embed classify "
            f"--plan {plan_id}` first."
        )
    thresholds = _thresholds(con, sorted(set(table.column("run_id").to_pylist())), config.target)
    arms, images, y = _arms(table, thresholds, config)
    patients = dict(
        con.execute(
            "SELECT image_id, patient_id FROM images WHERE image_id IN (SELECT unnest($ids))",
            {"ids": list(images)},
        ).fetchall()
    )
    clusters = group_ids([patients.get(i) for i in images])
    with progress_bar(2 * len(arms) - 1, "study bootstrap", enabled=config.progress and config.n_boot > 0) as bar:
        for i, a in enumerate(arms):
            score_arm(a, y, clusters, config.n_boot, config.seed + i)
            bar.advance()
        ref = _reference(arms, config.reference)
        comparisons = []
        for a in arms:
            if a is not ref:
                comparisons.append(compare(a, ref, y, clusters, config.n_boot, config.seed))
                bar.advance()
    result = StudyResult(
        f"study-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}",
        plan_id,
        config.target,
        len(images),
        len(np.unique(clusters)),
        float(y.mean()),
        arms,
        ref.name,
        comparisons,
        plan=plan.describe(),
        notes=_left_out(con, plan_id, config.target, arms),
    )
    if config.plots:
        from cxr_embed import plots

        shown = [ref, *[a for a in arms if a.arm == FINETUNED]] if len(arms) > 2 else arms
        result.figures = [
            str(p)
            for p in plots.plot_study(
                Path(store.path) / "plots" / result.study_id, y, arms, shown, config.target
            )
        ]
    store.write_results("studies", study_table(result))
    return result


def study_table(result: StudyResult) -> pa.Table:
    """The ``studies`` rows of one study: per-arm metrics, then the paired comparisons."""
    rows: list[dict[str, Any]] = []
    for a in result.arms:
        for m in STUDY_METRICS:
            if m in a.values:
                lo, hi = a.cis.get(m, (None, None))
                rows.append(
                    {
                        "arm": a.arm,
                        "classifier": a.classifier,
                        "run_id": a.run_id,
                        "versus": None,
                        "metric": m,
                        "value": a.values[m],
                        "ci_low": lo,
                        "ci_high": hi,
                        "p_value": None,
                    }
                )
    by_name = {a.name: a for a in result.arms}
    for c in result.comparisons:
        a = by_name[c.arm]
        for m, v, ci, p in (
            ("roc_auc_diff", c.auc_diff, c.auc_diff_ci, c.delong_p),
            ("brier_diff", c.brier_diff, c.brier_diff_ci, None),
        ):
            rows.append(
                {
                    "arm": a.arm,
                    "classifier": a.classifier,
                    "run_id": a.run_id,
                    "versus": c.reference,
                    "metric": m,
                    "value": v,
                    "ci_low": ci[0],
                    "ci_high": ci[1],
                    "p_value": p,
                }
            )
    now = datetime.now(timezone.utc)
    common = {
        "study_id": result.study_id,
        "created_at": now,
        "plan_id": result.plan_id,
        "target": result.target,
        "n": result.n_images,
    }
    return pa.Table.from_pylist([{**common, **r} for r in rows], schema=RESULT_SCHEMAS["studies"])
