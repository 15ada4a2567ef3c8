"""``cxr-embed store migrate``: upgrade a version-1 store (no checksums) to the current format in place.

Version 1 recorded shards without sizes or checksums and kept fixed file names (``errors.parquet``,
``index/faiss.index``) and unrecorded result parts. Migration hashes each file as it is now and
records it, so from then on any change made outside cxr-embed is detected. It cannot tell whether
the files were already altered before migration: ``store validate`` runs right after it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cxr_embed.errors import StoreDamagedError, StoreError
from cxr_embed.store.layout import (
    ERRORS_FILE,
    INDEX_DIR,
    INDEX_FILE,
    MANIFEST,
    RESULTS_DIR,
    SCHEMA_VERSION,
    commit_manifest,
    entry_for_path,
    local_store_path,
)
from cxr_embed.store.lock import StoreLock


@dataclass
class MigrateResult:
    store: str
    from_version: int
    to_version: int
    files_hashed: int


def migrate_store(path: str | Path) -> MigrateResult:
    """Record sizes and sha256 of every file of a version-1 store and mark it version 2 (atomic commit)."""
    root = local_store_path(path)
    with StoreLock(root):
        try:
            manifest = json.loads((root / MANIFEST).read_bytes())
        except FileNotFoundError:
            raise StoreError(f"{root} is not a cxr-embed store (no {MANIFEST}).") from None
        except (OSError, ValueError) as exc:
            raise StoreDamagedError(
                f"{root / MANIFEST} is unreadable ({exc}); restore it from a backup."
            ) from None
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        if version == SCHEMA_VERSION:
            return MigrateResult(str(root), version, version, 0)
        if version != 1:
            raise StoreError(
                f"{root / MANIFEST} has schema_version {version!r}; only version 1 stores can be migrated."
            )
        hashed = 0
        try:
            for shard in manifest["shards"]:
                shard.update(entry_for_path(root, shard["file"]))
                hashed += 1
            manifest["next_part"] = len(manifest["shards"])
            if manifest.get("index") and (root / INDEX_DIR / INDEX_FILE).is_file():
                manifest["index"].update(entry_for_path(root, f"{INDEX_DIR}/{INDEX_FILE}"))
                hashed += 1
            else:
                manifest["index"] = None  # rebuilt by the next `cxr-embed index`
            manifest["errors_file"] = (
                entry_for_path(root, ERRORS_FILE) if (root / ERRORS_FILE).is_file() else None
            )
            hashed += manifest["errors_file"] is not None
            results = {}
            for folder in sorted(p for p in (root / RESULTS_DIR).glob("*") if p.is_dir()):
                results[folder.name] = [
                    entry_for_path(root, f"{RESULTS_DIR}/{folder.name}/{f.name}")
                    for f in sorted(folder.glob("part-*.parquet"))
                ]
                hashed += len(results[folder.name])
        except (OSError, KeyError, TypeError) as exc:
            raise StoreDamagedError(
                f"Cannot migrate {root}: a file store.json names is missing or unreadable ({exc})."
            ) from None
        manifest.update(schema_version=SCHEMA_VERSION, results=results, audit=manifest.get("audit", []))
        manifest.setdefault("model_dir", None)
        commit_manifest(root, manifest, results_from_disk=False)
    return MigrateResult(str(root), 1, SCHEMA_VERSION, hashed)
