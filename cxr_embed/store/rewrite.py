"""New versions of committed shards: metadata updates, row removal (erasure, prune, repair), compaction.

All three follow the writer's one rule: write every new file under a new name, commit the manifest
once (the single atomic step), delete superseded files after. A kill before the commit leaves the old
store plus orphans; after it, the new store plus files the next writer deletes.

Row ids stay dense 0..N-1 (every consumer indexes arrays by row_id, and FAISS ids are row_ids), so
removing rows renumbers the rows after the first removed one; ``image_id`` is the stable key. Result
tables are rewritten with the same renumbering (``row_id`` follows its ``image_id``), and the FAISS
index is rebuilt from the remaining Parquet vectors (HNSW cannot remove vectors, and IVF lists
trained with the removed rows would keep traces of them).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxr_embed.atomicio import write_bytes_atomic
from cxr_embed.records import ImageRecord
from cxr_embed.schema import METADATA_SCHEMA
from cxr_embed.store.layout import (
    CACHE_DIR,
    RESULTS_DIR,
    file_entry,
    manifest_lock,
    now,
    read_manifest,
    token,
)
from cxr_embed.store.reader import Store, read_table_verified
from cxr_embed.store.tables import embedding_matrix, metadata_table, shard_bytes

if TYPE_CHECKING:
    from cxr_embed.store.writer import StoreWriter

COMPARED_COLUMNS: tuple[str, ...] = tuple(n for n in METADATA_SCHEMA.names if n not in ("row_id", "image_id"))
"""Metadata that follows the source on a rerun: everything the listing provides."""


# ----------------------------------------------------------------------------- metadata updates


def changed_metadata(store: Store, listed: Mapping[str, ImageRecord]) -> dict[str, dict[str, Any]]:
    """image_id -> new metadata row, for stored rows whose listing metadata differs from the stored one."""
    if not listed or not len(store):
        return {}
    stored = store.metadata(["image_id", *COMPARED_COLUMNS])
    ids = stored.column("image_id").to_pylist()
    present = [i for i in ids if i in listed]
    if not present:
        return {}
    fresh = metadata_table([listed[i] for i in present])
    keep = pc.is_in(stored.column("image_id"), value_set=pa.array(present, pa.string()))
    old = stored.filter(keep)  # same order as ``present`` (store order)
    differs = np.zeros(len(present), dtype=bool)
    for name in COMPARED_COLUMNS:
        a, b = old.column(name), fresh.column(name)
        same = pc.fill_null(pc.equal(a, b), False)
        both_null = pc.and_(pc.is_null(a), pc.is_null(b))
        differs |= ~pc.or_(same, both_null).to_numpy(zero_copy_only=False)
    rows = fresh.filter(pa.array(differs)).to_pylist()
    return {r["image_id"]: r for r in rows}


def update_metadata(writer: StoreWriter, updates: Mapping[str, dict[str, Any]]) -> int:
    """Rewrite the shards holding ``updates`` with the new metadata; embeddings copied bit for bit."""
    store = writer.store
    assert store is not None
    manifest = writer.manifest_copy()
    done = 0
    for i, shard in enumerate(store.manifest["shards"]):
        table = store.shard_table(i)
        ids = table.column("image_id").to_pylist()
        hits = [j for j, image_id in enumerate(ids) if image_id in updates]
        if not hits:
            continue
        columns = {}
        for name in table.column_names:
            if name not in COMPARED_COLUMNS:
                columns[name] = table.column(name)
                continue
            values = table.column(name).to_pylist()
            for j in hits:
                values[j] = updates[ids[j]][name]
            columns[name] = pa.array(values, table.schema.field(name).type)
        rel = writer.new_shard_name(manifest)
        data = shard_bytes(pa.table(columns, schema=table.schema))
        write_bytes_atomic(data, writer.path / rel)
        manifest["shards"][i] = {**shard, **file_entry(rel, data)}
        writer.supersede(shard["file"])
        done += len(hits)
    writer.commit(manifest)
    return done


# ----------------------------------------------------------------------------- removal


def remove_rows(
    writer: StoreWriter,
    image_ids: Iterable[str],
    *,
    drop_shards: Iterable[int] = (),
    action: str,
    condition: str,
) -> int:
    """Remove rows (by image_id, or whole unreadable shards) from shards, index, errors, results and caches.

    Returns how many rows were removed. The audit record keeps when, how many and the kind of
    condition, never the identifiers.
    """
    drop = set(image_ids)
    drop_shards = set(drop_shards)
    store = writer.store
    assert store is not None
    manifest = writer.manifest_copy()
    shards_out: list[dict[str, Any]] = []
    vectors: list[np.ndarray] = []
    new_ids: dict[str, int] = {}
    removed, next_row, renumber = 0, 0, False
    for i, shard in enumerate(store.manifest["shards"]):
        if i in drop_shards:
            removed += shard["rows"]
            renumber = True
            writer.supersede(shard["file"])
            continue
        table = store.shard_table(i)
        keep = pc.invert(pc.is_in(table.column("image_id"), value_set=pa.array(sorted(drop), pa.string())))
        kept = table.filter(keep)
        removed += table.num_rows - kept.num_rows
        renumber = renumber or kept.num_rows != table.num_rows
        new_ids.update(
            zip(kept.column("image_id").to_pylist(), range(next_row, next_row + kept.num_rows), strict=True)
        )
        vectors.append(embedding_matrix(kept.column("embedding"), store.dim))
        if not renumber:
            shards_out.append(shard)
        else:
            writer.supersede(shard["file"])
            if kept.num_rows:
                kept = kept.set_column(
                    kept.column_names.index("row_id"),
                    "row_id",
                    pa.array(np.arange(next_row, next_row + kept.num_rows, dtype=np.int64)),
                )
                rel = writer.new_shard_name(manifest)
                data = shard_bytes(kept)
                write_bytes_atomic(data, writer.path / rel)
                shards_out.append({**file_entry(rel, data), "rows": kept.num_rows, "first_row_id": next_row})
        next_row += kept.num_rows
    if not removed:
        return 0
    manifest["shards"] = shards_out
    manifest["counts"]["rows"] = next_row
    errors = store.errors()
    dropped_errors = pc.is_in(errors.column("image_id"), value_set=pa.array(sorted(drop), pa.string()))
    if pc.any(dropped_errors).as_py():
        writer.set_errors(manifest, errors.filter(pc.invert(dropped_errors)))
    emb = np.concatenate(vectors) if vectors else np.zeros((0, store.dim), np.float32)
    requested = (manifest.get("index") or {}).get("requested") or "auto"
    if manifest.get("index"):
        writer.update_index(manifest, store, requested, rebuild=True, embeddings=emb)
    shutil.rmtree(writer.path / CACHE_DIR, ignore_errors=True)  # listing caches are rebuilt on demand
    manifest.setdefault("audit", []).append(
        {"at": now(), "action": action, "rows": removed, "condition": condition}
    )
    with manifest_lock(writer.path):
        # under the lock so a classify run cannot add a result part between this rewrite and the commit
        disk_results = read_manifest(writer.path).get("results") or {}
        manifest["results"] = _rewrite_results(writer, disk_results, drop, new_ids)
        writer.commit(manifest, results_from_disk=False, locked=True)
    return removed


def _rewrite_results(
    writer: StoreWriter, results: dict[str, list[dict[str, Any]]], drop: set[str], new_ids: dict[str, int]
) -> dict[str, list[dict[str, Any]]]:
    """Every result part without the removed images, its row_ids following their image_ids."""
    out: dict[str, list[dict[str, Any]]] = {}
    drop_set = pa.array(sorted(drop), pa.string())
    for table_name, entries in results.items():
        out[table_name] = []
        for entry in entries:
            table = read_table_verified(writer.path, entry, "result file")
            if "image_id" not in table.column_names:
                out[table_name].append(entry)
                continue
            kept = table.filter(
                pc.invert(pc.fill_null(pc.is_in(table.column("image_id"), value_set=drop_set), False))
            )
            if "row_id" in kept.column_names:
                remapped = [
                    new_ids.get(i) if r is not None else None
                    for i, r in zip(
                        kept.column("image_id").to_pylist(), kept.column("row_id").to_pylist(), strict=True
                    )
                ]
                kept = kept.set_column(
                    kept.column_names.index("row_id"), "row_id", pa.array(remapped, pa.int64())
                )
            if kept.equals(table):
                out[table_name].append(entry)
                continue
            writer.supersede(entry["file"])
            if kept.num_rows:
                rel = f"{RESULTS_DIR}/{table_name}/part-{time.time_ns():020d}-{token()}.parquet"
                data = shard_bytes(kept)
                write_bytes_atomic(data, writer.path / rel)
                out[table_name].append(file_entry(rel, data))
    return out


# ----------------------------------------------------------------------------- compaction


def compact(writer: StoreWriter, target_rows: int) -> tuple[int, int]:
    """Merge runs of consecutive small shards into shards of up to ``target_rows`` rows.

    Row ids, embeddings and the index are unchanged (same rows, same order). Returns
    (shards before, shards after).
    """
    store = writer.store
    assert store is not None
    manifest = writer.manifest_copy()
    shards = store.manifest["shards"]
    groups: list[list[int]] = []
    for i, shard in enumerate(shards):
        if groups and sum(shards[j]["rows"] for j in groups[-1]) + shard["rows"] <= target_rows:
            groups[-1].append(i)
        else:
            groups.append([i])
    if len(groups) == len(shards):
        return len(shards), len(shards)
    out = []
    for group in groups:
        if len(group) == 1:
            out.append(shards[group[0]])
            continue
        merged = pa.concat_tables([store.shard_table(i) for i in group])
        rel = writer.new_shard_name(manifest)
        data = shard_bytes(merged)
        write_bytes_atomic(data, writer.path / rel)
        out.append(
            {
                **file_entry(rel, data),
                "rows": merged.num_rows,
                "first_row_id": shards[group[0]]["first_row_id"],
            }
        )
        writer.supersede(*(shards[i]["file"] for i in group))
    manifest["shards"] = out
    manifest.setdefault("audit", []).append(
        {"at": now(), "action": "compact", "rows": 0, "condition": f"{len(shards)} -> {len(out)} shards"}
    )
    writer.commit(manifest)
    return len(shards), len(out)
