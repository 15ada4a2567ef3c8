"""The store's table schemas: the one place every column of every store file is defined.

Why a module of its own: the store, the readers (which fill the metadata columns), the result
writers (classify, finetune, study) and SQL all agree on these; keeping them apart from the
store's I/O lets each grow without touching the others.
"""

from __future__ import annotations

import pyarrow as pa

from cxr_embed.records import FINDINGS

IDENTITY_COLUMNS: tuple[str, ...] = ("model_id", "checkpoint_sha256", "preprocess_fingerprint")

METADATA_SCHEMA = pa.schema(
    [
        pa.field("row_id", pa.int64(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("path", pa.string()),
        pa.field("patient_id", pa.string()),
        pa.field("study", pa.int32()),
        pa.field("split", pa.string()),
        pa.field("label", pa.int8()),
        *[pa.field(name, pa.int8()) for name in FINDINGS],
        pa.field("sex", pa.string()),
        pa.field("age", pa.float32()),
        pa.field("view", pa.string()),
        pa.field("source", pa.string()),
        pa.field("modality", pa.string()),
        pa.field("body_part", pa.string()),
        pa.field("photometric", pa.string()),
        pa.field("bits_stored", pa.int16()),
        pa.field("rows", pa.int32()),
        pa.field("columns", pa.int32()),
        pa.field("pixel_spacing_row", pa.float32()),
        pa.field("pixel_spacing_col", pa.float32()),
        pa.field("manufacturer", pa.string()),
        pa.field("model_name", pa.string()),
        pa.field("frames", pa.int32()),
    ]
)
"""Every shard column but ``embedding`` and the identity columns, in file order."""

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string()),
        pa.field("path", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("run_at", pa.timestamp("us", tz="UTC")),
    ]
)

_TIMESTAMP = pa.timestamp("us", tz="UTC")

AUDIT_SCHEMA = pa.schema(
    [
        pa.field("time", pa.timestamp("us", tz="UTC")),
        pa.field("key_id", pa.string()),
        pa.field("endpoint", pa.string()),
        pa.field("status", pa.int32()),
        pa.field("input_kind", pa.string()),
        pa.field("inputs", pa.int32()),
        pa.field("input_bytes", pa.int64()),
        pa.field("model_id", pa.string()),
        pa.field("checkpoint_sha256", pa.string()),
        pa.field("classifier", pa.string()),
        pa.field("classifier_run", pa.string()),
        pa.field("classifier_sha256", pa.string()),
        pa.field("thresholds", pa.string()),
        pa.field("decision", pa.string()),
        pa.field("abstained", pa.int32()),
        pa.field("latency_ms", pa.float64()),
        pa.field("error", pa.string()),
    ]
)
"""``results/audit/part-*.parquet``: one row per call to ``cxr-embed serve`` (cxr_embed/serve/audit.py);
no identifiers, no pixels (so erasing images leaves it untouched). Recorded in store.json like every result table."""

RESULT_SCHEMAS: dict[str, pa.Schema] = {
    # One row per evaluated image: calibrated probability and the classifier's raw one beside it.
    "predictions": pa.schema(
        [
            ("run_id", pa.string()),
            ("plan_id", pa.string()),
            ("arm", pa.string()),
            ("classifier", pa.string()),
            ("target", pa.string()),
            ("fold", pa.int32()),
            ("row_id", pa.int64()),
            ("image_id", pa.string()),
            ("probability", pa.float64()),
            ("probability_raw", pa.float64()),
            ("label", pa.int8()),
        ]
    ),
    # fold -1 = pooled; subgroup/level NULL for the whole plan, else e.g. ('sex', 'F').
    "metrics": pa.schema(
        [
            ("run_id", pa.string()),
            ("plan_id", pa.string()),
            ("arm", pa.string()),
            ("classifier", pa.string()),
            ("target", pa.string()),
            ("fold", pa.int32()),
            ("subgroup", pa.string()),
            ("level", pa.string()),
            ("metric", pa.string()),
            ("value", pa.float64()),
            ("ci_low", pa.float64()),
            ("ci_high", pa.float64()),
        ]
    ),
    # params: JSON (plan_id, bootstrap_unit, ...); warnings: JSON list of what the user must know.
    "runs": pa.schema(
        [
            ("run_id", pa.string()),
            ("kind", pa.string()),
            ("created_at", _TIMESTAMP),
            ("params", pa.string()),
            ("versions", pa.string()),
            ("timings", pa.string()),
            ("warnings", pa.string()),
        ]
    ),
    # The evaluation plans: fold = test fold (K folds, else 0); split = train/val/test (one-split plans).
    "splits": pa.schema(
        [
            ("plan_id", pa.string()),
            ("kind", pa.string()),
            ("seed", pa.int64()),
            ("params", pa.string()),
            ("created_at", _TIMESTAMP),
            ("row_id", pa.int64()),
            ("image_id", pa.string()),
            ("fold", pa.int32()),
            ("split", pa.string()),
        ]
    ),
    # The study: per arm rows (versus NULL) and paired comparisons (versus = the reference arm).
    "studies": pa.schema(
        [
            ("study_id", pa.string()),
            ("created_at", _TIMESTAMP),
            ("plan_id", pa.string()),
            ("target", pa.string()),
            ("arm", pa.string()),
            ("classifier", pa.string()),
            ("run_id", pa.string()),
            ("versus", pa.string()),
            ("metric", pa.string()),
            ("value", pa.float64()),
            ("ci_low", pa.float64()),
            ("ci_high", pa.float64()),
            ("p_value", pa.float64()),
            ("n", pa.int64()),
        ]
    ),
    # A fine-tuning sweep: one row per grid cell, validation metrics only; selected = the cell tested.
    "sweep": pa.schema(
        [
            ("sweep_id", pa.string()),
            ("created_at", _TIMESTAMP),
            ("plan_id", pa.string()),
            ("lr", pa.float64()),
            ("weight_decay", pa.float64()),
            ("run_id", pa.string()),
            ("status", pa.string()),
            ("val_roc_auc", pa.float64()),
            ("val_brier", pa.float64()),
            ("selected", pa.bool_()),
            ("out", pa.string()),
        ]
    ),
    # One row per call to `cxr-embed serve` (never an identifier): see AUDIT_SCHEMA.
    "audit": AUDIT_SCHEMA,
}


def shard_schema(dim: int) -> pa.Schema:
    """The full schema of an embedding shard for ``dim``-dimensional embeddings."""
    return pa.schema(
        [
            *METADATA_SCHEMA,
            pa.field("embedding", pa.list_(pa.float32(), dim)),
            *[pa.field(name, pa.string()) for name in IDENTITY_COLUMNS],
        ]
    )
