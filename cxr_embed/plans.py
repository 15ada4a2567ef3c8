"""The evaluation plan: which rows are evaluated and how they are split, made once and stored.

Why a stored plan: the study compares classifiers on frozen embeddings with a fine-tuned model, and
that comparison only means something when both arms were tested on the *same* images. A plan is
made once from its settings (patient-grouped stratified K folds, ChestX-ray14's official split, or
a patient-disjoint hold-out fraction; optionally restricted by a SQL ``--where`` condition on
``images`` and a stratified whole-patient ``--sample``), written to the store's ``splits`` table
and reused by ``classify``, ``finetune`` and ``study``. Its id is a hash of the settings and the
selected rows, so the same settings on the same store give the same plan (nothing is re-drawn).

Rules every plan obeys, and why:

* **Folds are grouped by patient** (and stratified by label). ChestX-ray14 has ~3.7 images per
  patient; an image-level split puts a patient's follow-up scans on both sides and inflates every
  metric. :func:`check_leakage` counts patients shared by train and test and refuses any plan where
  a count is not 0. Rows without a patient id are their own group.
* **Only rows with a label** take part (nothing can be scored without one).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxr_embed.errors import ConfigError, EvaluationError
from cxr_embed.schema import RESULT_SCHEMAS

PLAN_KINDS = ("kfold", "holdout", "official")
#: ``classify --split`` spellings → plan kinds.
SPLIT_ALIASES = {"cv": "kfold", "kfold": "kfold", "holdout": "holdout", "official": "official"}
TRAIN, VAL, TEST = "train", "val", "test"


# --------------------------------------------------------------------------------------- folds


@dataclass(frozen=True)
class Fold:
    """Row indices (into the evaluated rows) of one train/test split."""

    index: int
    train: np.ndarray
    test: np.ndarray


def group_ids(patients: Sequence[Any]) -> np.ndarray:
    """Integer group per row from patient ids; a missing id (None/NaN/"") becomes its own group."""
    out = np.empty(len(patients), dtype=np.int64)
    codes: dict[Any, int] = {}
    for i, p in enumerate(patients):
        missing = p is None or p == "" or (isinstance(p, float) and np.isnan(p))
        out[i] = codes.setdefault(("__row__", i) if missing else p, len(codes))
    return out


def patient_group_folds(labels, groups, k: int = 5, seed: int = 0) -> list[Fold]:
    """``k`` folds stratified by label with every patient (group) in exactly one test fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    y = np.asarray(labels)
    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    if k < 2:
        raise ConfigError(f"--folds must be at least 2 (got {k}).")
    if n_groups < k:
        raise EvaluationError(f"Only {n_groups} patients for {k} folds; use fewer folds or more data.")
    if len(np.unique(y)) < 2:
        raise EvaluationError(
            "Only one class among the labelled rows; ROC-AUC and the other metrics need both."
        )
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [Fold(i, tr, te) for i, (tr, te) in enumerate(splitter.split(np.zeros(len(y)), y, groups))]


def official_split(splits: Sequence[str | None]) -> list[Fold]:
    """One fold: train on rows whose split is "train" (train_val), test on "test" (test_list)."""
    s = np.asarray([x or "" for x in splits])
    train, test = np.flatnonzero(s == TRAIN), np.flatnonzero(s == TEST)
    if not len(train) or not len(test):
        raise EvaluationError(
            f"--split official needs rows marked train and test (found {len(train)} train, {len(test)} test); "
            "index ChestX-ray14 with its train_val_list.txt/test_list.txt, or use --split cv or holdout."
        )
    return [Fold(0, train, test)]


def shared_patients(folds: Sequence[Fold], groups) -> list[int]:
    """Number of patients (groups) present on both sides, per fold."""
    groups = np.asarray(groups)
    return [len(np.intersect1d(groups[f.train], groups[f.test])) for f in folds]


def check_leakage(folds: Sequence[Fold], groups) -> list[int]:
    """Return the per-fold shared-patient counts; raise :class:`EvaluationError` if any is not 0."""
    counts = shared_patients(folds, groups)
    if any(counts):
        detail = ", ".join(f"fold {f.index}: {c}" for f, c in zip(folds, counts, strict=True))
        raise EvaluationError(
            f"Patient leakage: the same patients appear in training and test ({detail}). Metrics would be "
            "optimistic, so none are reported. Check the store's patient_id column (and the official lists)."
        )
    return counts


def carve_patients(
    indices: np.ndarray, groups: np.ndarray, positive: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Move ``fraction`` of the patients in ``indices`` out (stratified by "patient has a positive").

    Returns ``(kept, carved)``. Used for hold-out test slices and fine-tuning's validation slice.
    """
    pats = groups[indices]
    pos_pats = set(pats[positive[indices]].tolist())
    taken: list[Any] = []
    for stratum in (sorted(pos_pats, key=str), sorted(set(pats.tolist()) - pos_pats, key=str)):
        order = rng.permutation(len(stratum))
        n_take = int(round(len(stratum) * fraction))
        if len(stratum) >= 2:
            n_take = max(1, n_take)
        taken.extend(stratum[i] for i in order[:n_take])
    mask = np.isin(pats, np.array(taken, dtype=pats.dtype))
    return indices[~mask], indices[mask]


def holdout_slice(labels, groups, fraction: float = 0.2, max_rows: int = 10_000, seed: int = 0):
    """Split training rows into ``(fit, held_out)``, patient-disjoint, stratified when possible.

    The held-out slice is what calibration and operating points are fitted on; capping it keeps
    most of the training data for the classifier on large stores (10k rows pin a threshold well).
    """
    y, groups = np.asarray(labels), np.asarray(groups)
    frac = min(fraction, max_rows / max(len(y), 1))
    k = int(np.clip(round(1 / max(frac, 1e-9)), 2, 1000))
    if len(np.unique(groups)) < k or len(np.unique(y)) < 2:
        return np.arange(len(y)), np.empty(0, dtype=np.int64)
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

    if len(np.unique(groups)) > 5000:  # StratifiedGroupKFold's greedy loop is slow on many groups and k
        fit, held = next(GroupShuffleSplit(1, test_size=1 / k, random_state=seed).split(y, y, groups))
    else:
        fit, held = next(StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(y, y, groups))
    if len(np.unique(y[held])) < 2 or len(np.unique(y[fit])) < 2:
        return np.arange(len(y)), np.empty(0, dtype=np.int64)
    return fit, held


# --------------------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class PlanSettings:
    """What defines a plan; equal settings on the same rows give the same plan id."""

    kind: str = "kfold"
    folds: int = 5
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    seed: int = 0
    where: str | None = None
    sample: int | None = None

    def validate(self) -> None:
        if self.kind not in PLAN_KINDS:
            raise ConfigError(f"Unknown plan kind {self.kind!r}; use one of {', '.join(PLAN_KINDS)}.")
        if self.kind == "kfold" and self.folds < 2:
            raise ConfigError(f"--folds must be at least 2 (got {self.folds}).")
        if not 0 < self.test_fraction < 0.9 or not 0 < self.val_fraction < 0.5:
            raise ConfigError("--test-fraction must lie in (0, 0.9) and the validation fraction in (0, 0.5).")
        if self.sample is not None and self.sample < 10:
            raise ConfigError(f"--sample must be at least 10 images (got {self.sample}).")

    def params(self) -> dict[str, Any]:
        """The settings that matter for this kind (folds mean nothing to a hold-out plan)."""
        p = asdict(self)
        if self.kind != "kfold":
            p.pop("folds")
        if self.kind != "holdout":
            p.pop("test_fraction")
        return p


@dataclass
class Plan:
    """A stored evaluation plan: per selected store row, its test fold (K folds) or train/val/test."""

    plan_id: str
    settings: PlanSettings
    row_id: np.ndarray  # int64 store row ids, ascending
    image_id: np.ndarray  # object
    fold: np.ndarray  # int32: the test fold (K folds); 0 on a one-split plan
    split: np.ndarray  # object: "train" | "val" | "test" (one-split plans); None for K folds

    @property
    def kind(self) -> str:
        return self.settings.kind

    def __len__(self) -> int:
        return len(self.row_id)

    def positions(self, store_row_ids: np.ndarray) -> np.ndarray:
        """Positions of the plan's rows in ``store_row_ids`` (the store's metadata order)."""
        order = np.argsort(store_row_ids)
        pos = order[np.searchsorted(store_row_ids, self.row_id, sorter=order)]
        if not np.array_equal(np.asarray(store_row_ids)[pos], self.row_id):
            raise EvaluationError(f"Plan {self.plan_id} names rows the store no longer has; make a new plan.")
        return pos

    def folds(self, members: np.ndarray | None = None) -> list[Fold]:
        """Train/test folds over the plan's rows (or over ``members``, indices into them, e.g. the rows
        with a given finding); indices in each :class:`Fold` refer to ``members``' order."""
        members = np.arange(len(self)) if members is None else np.asarray(members)
        if self.kind == "kfold":
            f = self.fold[members]
            return [Fold(int(k), np.flatnonzero(f != k), np.flatnonzero(f == k)) for k in np.unique(f)]
        s = self.split[members]
        return [Fold(0, np.flatnonzero(s != TEST), np.flatnonzero(s == TEST))]

    def describe(self) -> str:
        s = self.settings
        what = {
            "kfold": f"{s.folds} patient-grouped folds",
            "holdout": f"hold-out {s.test_fraction:g} of patients",
            "official": "official split",
        }[s.kind]
        extra = (f", where {s.where!r}" if s.where else "") + (f", sample {s.sample}" if s.sample else "")
        return f"{self.plan_id}: {what}, {len(self)} images{extra}"


def select_rows(store, where: str | None) -> np.ndarray:
    """row_ids of the images matching the SQL condition ``where`` (all rows when None)."""
    if not where:
        return np.asarray(store.metadata(columns=["row_id"]).column("row_id").to_numpy(), dtype=np.int64)
    import duckdb

    try:
        rows = (
            store.connect().execute(f"SELECT row_id FROM images WHERE {where} ORDER BY row_id").fetchnumpy()
        )
    except duckdb.Error as exc:
        raise ConfigError(
            f"--where {where!r} is not a valid condition on the images view: "
            f"{str(exc).splitlines()[0]}. Example: --where \"view = 'PA' AND age >= 18\"."
        ) from None
    return np.asarray(rows["row_id"], dtype=np.int64)


def sample_patients(labels: np.ndarray, groups: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Positions of about ``n`` rows made of whole patients, stratified by "patient has a positive".

    Each stratum contributes its share of ``n`` images; patients are drawn in a seeded order until the
    share is reached, so a patient's images are never split between sample and rest.
    """
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    uniq, inv = np.unique(groups, return_inverse=True)
    per_patient = np.bincount(inv)
    positive = np.bincount(inv, weights=labels) > 0
    chosen = []
    for stratum in (positive, ~positive):
        pats = rng.permutation(np.flatnonzero(stratum))
        target = n * per_patient[stratum].sum() / len(labels)
        cum = np.cumsum(per_patient[pats])
        chosen.append(pats[: int(np.searchsorted(cum, target)) + 1])
    keep = np.isin(inv, np.concatenate(chosen))
    return np.flatnonzero(keep)


def _assign(settings: PlanSettings, y: np.ndarray, groups: np.ndarray, official: np.ndarray):
    """(fold, split) arrays for the selected rows."""
    n = len(y)
    if settings.kind == "kfold":
        fold = np.empty(n, dtype=np.int32)
        for f in patient_group_folds(y, groups, settings.folds, settings.seed):
            fold[f.test] = f.index
        return fold, np.full(n, None, dtype=object)
    rng = np.random.default_rng(settings.seed)
    positive = y == 1
    if settings.kind == "official":
        (f,) = official_split(official)  # checks both lists are present; unlisted rows join train
        train, test = np.flatnonzero(official != TEST), f.test
    else:
        train, test = carve_patients(np.arange(n), groups, positive, settings.test_fraction, rng)
    train, val = carve_patients(train, groups, positive, settings.val_fraction, rng)
    split = np.full(n, TRAIN, dtype=object)
    split[val], split[test] = VAL, TEST
    for name, idx in ((TRAIN, train), (VAL, val), (TEST, test)):
        if len(np.unique(y[idx])) < 2:
            raise EvaluationError(
                f"The plan's {name} rows hold a single class ({len(idx)} images); "
                "use more data (a larger --sample) or another --seed."
            )
    check_leakage([Fold(0, np.concatenate([train, val]), test), Fold(1, train, val)], groups)
    return np.zeros(n, dtype=np.int32), split


def plan_id_for(settings: PlanSettings, row_ids: np.ndarray) -> str:
    digest = hashlib.sha256(json.dumps(settings.params(), sort_keys=True).encode())
    digest.update(np.ascontiguousarray(row_ids, dtype=np.int64).tobytes())
    return f"{settings.kind}-{digest.hexdigest()[:10]}"


def make_plan(store, settings: PlanSettings) -> Plan:
    """Compute the plan for ``settings`` on ``store`` (nothing is written; see :func:`get_or_make_plan`)."""
    settings.validate()
    if len(store) == 0:
        raise EvaluationError("The store is empty; index some images first (`cxr-embed index`).")
    meta = store.metadata(columns=["row_id", "image_id", "patient_id", "label", "split"])
    row_id = np.asarray(meta.column("row_id").to_numpy(), dtype=np.int64)
    keep = np.isin(row_id, select_rows(store, settings.where)) & np.asarray(meta.column("label").is_valid())
    if keep.sum() < 10:
        raise EvaluationError(
            f"Only {int(keep.sum())} labelled images match the plan's rows; at least 10 are needed."
        )
    pos = np.flatnonzero(keep)
    y = np.asarray(meta.column("label").to_numpy(zero_copy_only=False), dtype=np.float64)[pos].astype(
        np.int64
    )
    image_ids = np.asarray(meta.column("image_id").to_pylist(), dtype=object)
    # patient ids as keys (a missing one: the image is its own patient), so carving orders patients by id
    groups = np.array(
        [p or f"image:{i}" for p, i in zip(meta.column("patient_id").to_pylist(), image_ids, strict=True)],
        dtype=object,
    )[pos]
    if settings.sample is not None:
        sub = sample_patients(y, groups, settings.sample, settings.seed)
        pos, y, groups = pos[sub], y[sub], groups[sub]
    official = np.asarray([s or "" for s in meta.column("split").to_pylist()], dtype=object)[pos]
    fold, split = _assign(settings, y, groups, official)
    ids = row_id[pos]
    return Plan(plan_id_for(settings, ids), settings, ids, image_ids[pos], fold, split)


def plan_table(plan: Plan) -> pa.Table:
    """The plan's rows of the ``splits`` table."""
    n = len(plan)
    return pa.Table.from_pydict(
        {
            "plan_id": [plan.plan_id] * n,
            "kind": [plan.kind] * n,
            "seed": [plan.settings.seed] * n,
            "params": [json.dumps(plan.settings.params(), sort_keys=True)] * n,
            "created_at": [datetime.now(timezone.utc)] * n,
            "row_id": plan.row_id,
            "image_id": list(plan.image_id),
            "fold": plan.fold,
            "split": list(plan.split),
        },
        schema=RESULT_SCHEMAS["splits"],
    )


def _stored(store) -> pa.Table | None:
    return store.read_results("splits")


def plan_ids(store) -> list[str]:
    """Ids of the stored plans, oldest first."""
    table = _stored(store)
    return [] if table is None else list(dict.fromkeys(table.column("plan_id").to_pylist()))


def load_plan(store, plan_id: str) -> Plan:
    """The stored plan ``plan_id``; EvaluationError listing the known plans otherwise."""
    table = _stored(store)
    rows = None if table is None else table.filter(pc.equal(table.column("plan_id"), plan_id))
    if rows is None or rows.num_rows == 0:
        known = ", ".join(plan_ids(store)) or "none yet"
        raise EvaluationError(
            f"No plan {plan_id!r} in {store.path} (known plans: {known}). Run `cxr-embed classify` "
            "or `cxr-embed finetune` without --plan to make one."
        )
    rows = rows.sort_by("row_id")
    params = json.loads(rows.column("params")[0].as_py())
    settings = PlanSettings(**{**params, "kind": rows.column("kind")[0].as_py()})
    return Plan(
        plan_id,
        settings,
        np.asarray(rows.column("row_id").to_numpy(), dtype=np.int64),
        np.asarray(rows.column("image_id").to_pylist(), dtype=object),
        np.asarray(rows.column("fold").to_numpy(), dtype=np.int32),
        np.asarray(rows.column("split").to_pylist(), dtype=object),
    )


def get_or_make_plan(store, settings: PlanSettings | None = None, plan_id: str | None = None) -> Plan:
    """``--plan ID`` when given; else the stored plan with these settings on these rows, made and
    written to the ``splits`` table the first time."""
    if plan_id:
        return load_plan(store, plan_id)
    plan = make_plan(store, settings or PlanSettings())
    if plan.plan_id not in plan_ids(store):
        store.write_results("splits", plan_table(plan))
    return plan
