"""The store's on-disk layout: file names, the ``store.json`` manifest, checksums and damage messages.

Every file a reader trusts is named in ``store.json`` with its size and sha256, written at the commit
that made it. Files are never rewritten in place: a new version gets a new name, the manifest is
replaced atomically to point at it, and only then is the old version deleted. So a process killed at
any instant leaves the old or the new store (plus orphans the next writer removes), and a recorded
checksum that does not match means the file was changed by something other than cxr-embed.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cxr_embed.atomicio import write_json_atomic
from cxr_embed.errors import ConfigError, StoreDamagedError, StoreError

SCHEMA_VERSION = 2
MANIFEST = "store.json"
LOCK_FILE = ".lock"
MANIFEST_LOCK = ".manifest.lock"
EMBEDDINGS_DIR = "embeddings"
INDEX_DIR = "index"
INDEX_FILE = "faiss.index"
"""The index's name in version-1 stores; version 2 names each build ``index/faiss-<token>.index``."""
ERRORS_FILE = "errors.parquet"
"""errors' name in version-1 stores; version 2 names each version ``errors-<token>.parquet``."""
RESULTS_DIR = "results"
CACHE_DIR = "cache"
PARQUET_MAGIC = b"PAR1"
_HASH_CHUNK = 8 << 20


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def token() -> str:
    """A short unique suffix for a new file version (files are never rewritten in place)."""
    return uuid.uuid4().hex[:12]


def local_store_path(store_dir: str | Path) -> Path:
    """``store_dir`` as a local path; ``file://`` URIs accepted, other schemes refused with advice.

    Every reader and writer relies on POSIX semantics (``flock``, atomic ``rename``, ``fsync``) that
    object stores (s3://, gs://, abfs://) lack.
    """
    text = str(store_dir)
    if "://" not in text:
        return Path(text).expanduser()
    uri = urlparse(text)
    if uri.scheme == "file":
        return Path(uri.path)
    raise ConfigError(
        f"--store {text}: a store must be on a POSIX filesystem the driver can lock and rename on (a local disk or "
        f"a shared mount such as NFS/Lustre), not {uri.scheme}://. Write it to a local path and copy it to "
        f"{uri.scheme}:// when done (e.g. `aws s3 sync`); only the driver writes it, so workers do not need it."
    )


# ----------------------------------------------------------------------------- checksums


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_path(path: Path) -> str:
    """Streaming sha256 of a file (bounded memory, for files that are not read anyway)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(rel: str, data: bytes) -> dict[str, Any]:
    """The manifest entry of a file about to be committed with content ``data``."""
    return {"file": rel, "bytes": len(data), "sha256": sha256_bytes(data)}


def entry_for_path(root: Path, rel: str) -> dict[str, Any]:
    """The manifest entry of a file already on disk (migration of version-1 stores)."""
    path = root / rel
    return {"file": rel, "bytes": path.stat().st_size, "sha256": sha256_path(path)}


def validate_hint(root: Path) -> str:
    return f"run `cxr-embed store validate --store {root}` to list every problem"


def damaged(root: Path, what: str, rel: str, why: str, fix: str | None = None) -> StoreDamagedError:
    """The one wording of "this file is damaged" (what, why, what to do)."""
    fix = (
        fix
        or "rerun `cxr-embed index` to rebuild it from the source images, or restore the store from a backup"
    )
    return StoreDamagedError(f"{what} {rel} is damaged ({why}); {validate_hint(root)}, then {fix}.")


def tampered(root: Path, what: str, rel: str) -> StoreDamagedError:
    return StoreDamagedError(
        f"{what} {rel} does not match its recorded checksum: the store was modified outside cxr-embed (a copy, "
        f"an edit or disk damage). Do not trust results from it; {validate_hint(root)}, then restore the store "
        "from a backup or rebuild it with `cxr-embed index`."
    )


def stat_check(root: Path, entry: dict[str, Any], what: str) -> None:
    """Cheap check every open does: the file exists, is a regular file and has its recorded size."""
    rel = entry["file"]
    path = root / rel
    try:
        st = path.stat()
    except FileNotFoundError:
        raise damaged(root, what, rel, "the file is missing") from None
    except OSError as exc:
        raise damaged(root, what, rel, f"cannot be read: {exc.strerror}") from None
    if not path.is_file():
        raise damaged(root, what, rel, "it is not a regular file")
    if st.st_size != entry["bytes"]:
        raise damaged(
            root,
            what,
            rel,
            f"{st.st_size:,} bytes, store.json recorded {entry['bytes']:,}: truncated, overwritten or modified outside cxr-embed",
        )


def read_checked(root: Path, entry: dict[str, Any], what: str, *, parquet: bool = True) -> bytes:
    """The file's bytes after checking its size (and Parquet magic) against ``entry``; not hashed yet."""
    stat_check(root, entry, what)
    rel = entry["file"]
    try:
        data = (root / rel).read_bytes()
    except OSError as exc:
        raise damaged(root, what, rel, f"cannot be read: {exc.strerror}") from None
    if len(data) != entry["bytes"]:
        raise damaged(
            root,
            what,
            rel,
            f"{len(data):,} bytes, store.json recorded {entry['bytes']:,}: truncated, overwritten or modified outside cxr-embed",
        )
    if parquet and (data[:4] != PARQUET_MAGIC or data[-4:] != PARQUET_MAGIC):
        raise damaged(root, what, rel, "not a Parquet file: its header or footer is missing")
    return data


def check_sha256(root: Path, entry: dict[str, Any], what: str, digest: str) -> None:
    if digest != entry["sha256"]:
        raise tampered(root, what, entry["file"])


def read_verified(root: Path, entry: dict[str, Any], what: str, *, parquet: bool = True) -> bytes:
    """The file's bytes after checking size, Parquet magic and sha256 against ``entry``.

    Hashing the bytes that are read anyway (instead of reading the file twice) is what keeps
    verification cheap: see ``benchmarks/store_checksums.py``.
    """
    data = read_checked(root, entry, what, parquet=parquet)
    check_sha256(root, entry, what, sha256_bytes(data))
    return data


# ----------------------------------------------------------------------------- manifest

_REQUIRED = {
    "model_id": str,
    "checkpoint_sha256": str,
    "preprocess_fingerprint": str,
    "dim": int,
    "counts": dict,
    "shards": list,
}
_SHARD_KEYS = {"file": str, "rows": int, "first_row_id": int, "bytes": int, "sha256": str}


def read_manifest(root: Path) -> dict[str, Any]:
    """``store.json`` parsed, version-checked and shape-checked; StoreError saying what to do."""
    path = root / MANIFEST
    if not path.exists():
        if path.is_symlink():
            raise StoreDamagedError(
                f"{path} is a broken link; the store is damaged: restore store.json from a backup."
            )
        raise StoreError(
            f"{root} is not a cxr-embed store (no {MANIFEST}). Create one with `cxr-embed index SOURCE --store {root}`."
        )
    if not path.is_file():
        raise StoreDamagedError(
            f"{path} is not a file (a directory?); the store is damaged: restore store.json from a backup."
        )
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreDamagedError(
            f"{path} is not valid JSON ({exc}); the store is damaged: restore store.json from a backup."
        ) from None
    except OSError as exc:
        raise StoreDamagedError(f"{path} cannot be read ({exc.strerror}).") from None
    if not isinstance(manifest, dict):
        raise StoreDamagedError(
            f"{path} is not a JSON object; the store is damaged: restore store.json from a backup."
        )
    version = manifest.get("schema_version")
    if version == 1:
        raise StoreError(
            f"{root} is a version-1 store (made by an older cxr-embed, without checksums). Run "
            f"`cxr-embed store migrate --store {root}` once to upgrade it in place (it records each file's sha256), then retry."
        )
    if version != SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema_version {version!r}; this cxr-embed reads version {SCHEMA_VERSION}. "
            "Upgrade cxr-embed or re-create the store."
        )
    _check_shape(path, manifest)
    return manifest


def _check_shape(path: Path, manifest: dict[str, Any]) -> None:
    bad = [k for k, t in _REQUIRED.items() if not isinstance(manifest.get(k), t)]
    shards = manifest.get("shards") if isinstance(manifest.get("shards"), list) else []
    for s in shards:
        if not isinstance(s, dict) or any(not isinstance(s.get(k), t) for k, t in _SHARD_KEYS.items()):
            bad.append("shards[...]")
            break
    counts = manifest.get("counts") if isinstance(manifest.get("counts"), dict) else {}
    if not isinstance(counts.get("rows"), int):
        bad.append("counts.rows")
    if bad:
        raise StoreDamagedError(
            f"{path} lacks or mangles {bad}; the store is damaged: restore store.json from a backup."
        )


@contextmanager
def manifest_lock(root: Path) -> Iterator[None]:
    """A short exclusive lock around read-modify-write of ``store.json``.

    The long-lived writer lock (``.lock``) is held by an index run for hours, while classify and
    finetune append result tables without it; they meet only here, for milliseconds.
    """
    path = root / MANIFEST_LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreError(
            f"Cannot open {path} ({exc.strerror}); remove it if it is not a regular file."
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def commit_manifest(
    root: Path, manifest: dict[str, Any], *, results_from_disk: bool = True, locked: bool = False
) -> dict[str, Any]:
    """Replace ``store.json`` atomically with ``manifest``; returns what was written.

    ``results`` entries are owned by result writers, which commit under the same short lock: unless
    the caller rewrote them itself (delete), the ones on disk are kept so no concurrent append is lost.
    ``locked``: the caller already holds :func:`manifest_lock`.
    """
    if not locked:
        with manifest_lock(root):
            return commit_manifest(root, manifest, results_from_disk=results_from_disk, locked=True)
    if results_from_disk and (root / MANIFEST).is_file():
        try:
            on_disk = json.loads((root / MANIFEST).read_bytes())
            manifest["results"] = on_disk.get("results", {}) if isinstance(on_disk, dict) else {}
        except ValueError:
            pass
    manifest["updated_at"] = now()
    write_json_atomic(manifest, root / MANIFEST)
    return manifest


def new_manifest(
    *, model_id: str, checkpoint_sha256: str, preprocess_fingerprint: str, dim: int, model_dir: str | None
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "model_id": model_id,
        "checkpoint_sha256": checkpoint_sha256,
        "preprocess_fingerprint": preprocess_fingerprint,
        "dim": int(dim),
        "model_dir": model_dir,
        "counts": {"rows": 0, "errors": 0, "shards": 0},
        "shards": [],
        "next_part": 0,
        "index": None,
        "errors_file": None,
        "results": {},
        "audit": [],
        "created_at": now(),
        "updated_at": now(),
    }


def referenced_files(manifest: dict[str, Any]) -> set[str]:
    """Every file (relative path) the manifest names: what orphan clean-up must keep."""
    files = {s["file"] for s in manifest["shards"]}
    for entry in (manifest.get("index"), manifest.get("errors_file")):
        if isinstance(entry, dict) and entry.get("file"):
            files.add(entry["file"])
    for parts in (manifest.get("results") or {}).values():
        files.update(p["file"] for p in parts)
    return files


def lock_error_holder(fd: int) -> str:
    """Who holds the writer lock, worded truthfully: the pid in ``.lock`` may be stale."""
    text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    if not text.isdigit():
        return "another process"
    pid = int(text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"another process (the lock file names pid {pid}, which is no longer running: a new writer is taking over)"
    except PermissionError:
        pass
    return f"another process (pid {pid})"


def is_lock_busy(exc: OSError) -> bool:
    return exc.errno in (errno.EAGAIN, errno.EACCES)
