"""Erasure on request: ``cxr-embed store delete`` (a withdrawn consent, a mislabelled batch) and compaction.

A delete removes the rows from every place a store keeps them: the Parquet shards, the FAISS index,
errors, every result table (predictions name rows) and listing caches, in one atomic commit (see
:mod:`cxr_embed.store.rewrite`). The store keeps an audit record of each delete: when, how many
rows and the kind of condition (patient / image / where), never the identifiers themselves, which
would defeat the erasure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxr_embed.errors import ConfigError
from cxr_embed.store.reader import Store
from cxr_embed.store.writer import StoreWriter


@dataclass
class DeleteResult:
    """What ``store delete`` matched and (unless ``dry_run``) removed."""

    store: str
    condition: str  # "patient", "image" or "where": the audit record keeps only this kind
    matched_rows: int
    matched_patients: int
    removed_rows: int
    rows_left: int
    dry_run: bool


def _matching_ids(
    store: Store, patients: Sequence[str], images: Sequence[str], where: str | None
) -> list[str]:
    meta = store.metadata(["row_id", "image_id", "patient_id"])
    if patients:
        mask = pc.fill_null(
            pc.is_in(meta.column("patient_id"), value_set=pa.array(list(patients), pa.string())), False
        )
    elif images:
        mask = pc.is_in(meta.column("image_id"), value_set=pa.array(list(images), pa.string()))
    else:
        from cxr_embed.retrieval import allowed_mask

        rows = allowed_mask(store, where)
        mask = pa.array(rows if rows is not None else np.ones(len(store), bool))
    return meta.filter(mask).column("image_id").to_pylist()


def delete_rows(
    path: str | Path,
    *,
    patients: Sequence[str] = (),
    images: Sequence[str] = (),
    where: str | None = None,
    dry_run: bool = False,
) -> DeleteResult:
    """Remove every row matching exactly one condition; ``dry_run`` only counts them."""
    given = [name for name, v in (("patient", patients), ("image", images), ("where", where)) if v]
    if len(given) != 1:
        raise ConfigError("Give exactly one condition: --patient ID ..., --image ID ... or --where SQL.")
    with StoreWriter.maintain(path) as writer:
        store = writer.store
        assert store is not None
        ids = _matching_ids(store, patients, images, where)
        meta = store.metadata(["image_id", "patient_id"])
        chosen = meta.filter(pc.is_in(meta.column("image_id"), value_set=pa.array(ids, pa.string())))
        n_patients = len(pc.unique(chosen.column("patient_id")).drop_null())
        removed = 0
        if ids and not dry_run:
            from cxr_embed.store.rewrite import remove_rows

            removed = remove_rows(writer, ids, action="delete", condition=given[0])
        return DeleteResult(
            str(writer.path), given[0], len(ids), n_patients, removed, len(store) - removed, dry_run
        )


@dataclass
class CompactResult:
    store: str
    shards_before: int
    shards_after: int
    rows: int


def compact_store(path: str | Path, *, target_rows: int = 4096) -> CompactResult:
    """Merge consecutive small shards (left by many small runs or deletes) into up to ``target_rows`` rows."""
    if target_rows < 1:
        raise ConfigError(f"--target-rows must be at least 1, got {target_rows}.")
    from cxr_embed.store.rewrite import compact

    with StoreWriter.maintain(path) as writer:
        before, after = compact(writer, target_rows)
        return CompactResult(str(writer.path), before, after, len(writer.store or []))
