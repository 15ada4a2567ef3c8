"""``cxr-embed store validate``: every check a reader relies on, one line per problem and what to do.

Unlike :meth:`Store.open` this never stops at the first problem (except an unreadable manifest): it
reports every check, so a user sees the whole state of a damaged store. It re-hashes every file,
re-reads every shard, and compares the FAISS vectors with the normalised Parquet vectors for every
row (exact kinds); IVF-PQ codes are lossy, so there the mean cosine between the two is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxr_embed import indexes
from cxr_embed.errors import StoreError
from cxr_embed.schema import IDENTITY_COLUMNS, RESULT_SCHEMAS
from cxr_embed.store.info import value_counts
from cxr_embed.store.layout import (
    EMBEDDINGS_DIR,
    LOCK_FILE,
    MANIFEST_LOCK,
    local_store_path,
    read_manifest,
    read_verified,
    referenced_files,
)
from cxr_embed.store.reader import Store, read_table_verified
from cxr_embed.store.tables import embedding_matrix

REINDEX = "rerun `cxr-embed index` with the same source and --store: it rebuilds this from the source images"
RESTORE = "restore the store (or store.json) from a backup, or re-create it with `cxr-embed index`"


@dataclass
class Check:
    """One validation check: ``status`` is "ok", "warn" (not corruption) or "fail"; ``fix`` says what to do."""

    name: str
    status: str
    detail: str
    fix: str = ""


@dataclass
class ValidationReport:
    """What ``cxr-embed store validate`` shows; ``ok`` is False when any check failed."""

    path: str
    rows: int
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    @property
    def problems(self) -> list[Check]:
        return [c for c in self.checks if c.status != "ok"]

    def add(self, name: str, passed: bool, detail: str, *, fix: str = "", warn_only: bool = False) -> bool:
        status = "ok" if passed else ("warn" if warn_only else "fail")
        self.checks.append(Check(name, status, detail, "" if passed else fix))
        return passed


_VALIDATE_CHUNK = 65_536


def validate_store(path: str | Path) -> ValidationReport:
    """Check everything a reader relies on: files and checksums, row_ids, identity, vectors, index agreement."""
    root = local_store_path(path)
    manifest = read_manifest(root)
    store = Store(root, manifest)
    report = ValidationReport(str(root), len(store))
    shards = manifest["shards"]
    total = sum(s["rows"] for s in shards)
    starts_ok = all(s["first_row_id"] == sum(t["rows"] for t in shards[:i]) for i, s in enumerate(shards))
    locks = [
        n
        for n in (LOCK_FILE, MANIFEST_LOCK)
        if ((root / n).exists() or (root / n).is_symlink()) and not (root / n).is_file()
    ]
    report.add(
        "lock files",
        not locks,
        f"{locks or 'regular files'}",
        fix=f"remove {' and '.join(str(root / n) for n in locks)} when no cxr-embed process is writing the store",
    )
    report.add(
        "counts",
        total == len(store) and starts_ok,
        f"store.json counts {len(store)} rows; its {len(shards)} shards hold {total}",
        fix=RESTORE,
    )
    emb = np.zeros((total, store.dim), np.float32)
    ids: list[str] = []
    bad = 0
    for i, _shard in enumerate(shards):
        bad += not _check_shard(report, store, i, emb, ids)
    if bad:  # one line per damaged shard above
        return report
    report.add("shards", True, f"{len(shards)} shards, all match their checksums")
    report.add(
        "image_ids unique", len(set(ids)) == len(ids), f"{len(set(ids))} distinct of {len(ids)}", fix=RESTORE
    )
    report.add(
        "embeddings finite", bool(np.isfinite(emb).all()), f"{total} x {store.dim} float32", fix=REINDEX
    )
    _check_other_files(report, store)
    keep = referenced_files(manifest)
    orphans = [
        p.name for p in (root / EMBEDDINGS_DIR).glob("*.parquet*") if f"{EMBEDDINGS_DIR}/{p.name}" not in keep
    ]
    report.add(
        "no orphan shards",
        not orphans,
        f"{len(orphans)} uncommitted file(s)",
        fix="nothing to do: the next `cxr-embed index` deletes them",
        warn_only=True,
    )
    if total == len(store):
        _validate_index(report, store, emb)
    return report


def _check_shard(report: ValidationReport, store: Store, i: int, emb: np.ndarray, ids: list[str]) -> bool:
    shard = store.manifest["shards"][i]
    name = f"shard {shard['file']}"
    try:
        table = store.shard_table(i)
        matrix = embedding_matrix(table.column("embedding"), store.dim)
    except (StoreError, pa.ArrowException, ValueError, OSError) as exc:
        return report.add(name, False, str(exc).split("; run `")[0].removeprefix(f"{name} "), fix=REINDEX)
    start = shard["first_row_id"]
    row_ids = table.column("row_id").to_numpy()
    if not np.array_equal(row_ids, np.arange(start, start + len(row_ids))):
        return report.add(name, False, f"row_ids are not {start}..{start + len(row_ids) - 1}", fix=REINDEX)
    wrong = [
        c
        for c in IDENTITY_COLUMNS
        if len(table) and pc.any(pc.not_equal(table.column(c), store.manifest[c])).as_py()
    ]
    if wrong:
        return report.add(
            name, False, f"rows from another model ({wrong} differ from store.json)", fix=REINDEX
        )
    if start + len(matrix) <= len(emb):
        emb[start : start + len(matrix)] = matrix
    ids.extend(table.column("image_id").to_pylist())
    return True


def _check_other_files(report: ValidationReport, store: Store) -> None:
    entry = store.manifest.get("errors_file")
    try:
        errors = store.errors()
        report.add(
            "errors file", True, f"{errors.num_rows} failed input(s): {value_counts(errors.column('stage'))}"
        )
    except StoreError as exc:
        report.add(
            f"errors file {entry['file'] if entry else ''}".strip(),
            False,
            str(exc).split("; run `")[0],
            fix="delete its entry by rerunning `cxr-embed index` (the failures are recorded again), or restore it",
        )
    for table in RESULT_SCHEMAS:
        for part in (store.manifest.get("results") or {}).get(table, []):
            try:
                read_table_verified(store.path, part, "result file")
            except StoreError as exc:
                report.add(
                    f"result {part['file']}",
                    False,
                    str(exc).split("; run `")[0],
                    fix="restore it from a backup or rerun the command that wrote it (classify / finetune)",
                )


def _validate_index(report: ValidationReport, store: Store, emb: np.ndarray) -> None:
    entry = store.manifest.get("index")
    if not report.add(
        "index present",
        bool(entry and entry.get("file")),
        str(store.index_path),
        fix="rerun `cxr-embed index` to finish the run (only the index is built)",
    ):
        return
    try:
        index = indexes.index_from_bytes(read_verified(store.path, entry, "index", parquet=False))
    except StoreError as exc:
        report.add(
            f"index {entry['file']}",
            False,
            str(exc).split("; run `")[0],
            fix="rerun `cxr-embed index`: it rebuilds a damaged index from the Parquet vectors",
        )
        return
    n = len(store)
    ids = indexes.index_ids(index)
    report.add(
        "index ids == row_ids",
        len(ids) == n and np.array_equal(ids, np.arange(n)),
        f"index holds {index.ntotal}, Parquet {n}",
        fix="rerun `cxr-embed index` to rebuild the index",
    )
    if len(ids) != n:
        return
    kind = store.index_kind
    expected = indexes.normalized(emb)
    if kind == "ivfpq":
        cos = [
            float(
                (
                    indexes.reconstruct_rows(index, np.arange(s, min(n, s + _VALIDATE_CHUNK)))
                    * expected[s : s + _VALIDATE_CHUNK]
                )
                .sum(1)
                .mean()
            )
            for s in range(0, n, _VALIDATE_CHUNK)
        ]
        mean = float(np.mean(cos)) if cos else 1.0
        report.add(
            "index vectors",
            mean > 0.8,
            f"PQ codes are lossy: mean cosine {mean:.3f} to the Parquet vectors",
            fix="rebuild the index with `cxr-embed index --index ivfpq`",
            warn_only=True,
        )
        return
    worst = 0.0
    for s in range(0, n, _VALIDATE_CHUNK):
        got = indexes.reconstruct_rows(index, np.arange(s, min(n, s + _VALIDATE_CHUNK)))
        worst = max(worst, float(np.abs(got - expected[s : s + _VALIDATE_CHUNK]).max(initial=0.0)))
    report.add(
        "index vectors == Parquet",
        worst <= 1e-6,
        f"{kind}: max |diff| {worst:.2e} over {n} rows",
        fix="rerun `cxr-embed index`: it rebuilds the index from the Parquet vectors",
    )
