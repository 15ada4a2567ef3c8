"""Atomic, durable file writes: the one helper every writer in the package uses.

Why: a reader (or a rerun after ``kill -9``) must see either the old file or the whole new one,
never half of it, and a committed rename must survive a power cut. The recipe is always the same:
write a temp file next to the target, fsync it, ``os.replace`` it over the target, fsync the
directory. Directories (checkpoints, exported models) are swapped the same way with
:func:`replace_dir`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "fsync_dir",
    "fsync_file",
    "fsync_tree",
    "recover_dir",
    "replace_dir",
    "temp_name",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_parquet_atomic",
    "write_text_atomic",
]


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (the directory entry itself must reach the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush one file's data to disk."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (before a directory is renamed into place)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fsync_file(Path(folder) / name)
        fsync_dir(Path(folder))


def temp_name(final: Path) -> Path:
    """A hidden sibling of ``final`` that no other process picks (pid + random suffix)."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _commit(tmp: Path, final: Path) -> None:
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)


@contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temp path to write; on clean exit it replaces ``final`` durably, on error it is removed.

    For writers that take a path (``pq.write_table``, ``safetensors.save_file``, ``faiss.write_index``).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        yield tmp
        _commit(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(data: bytes, final: str | Path, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``final`` atomically; ``mode`` (e.g. 0o600) is set before the file is visible."""
    with atomic_path(final) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        if mode is not None:
            os.chmod(tmp, mode)  # exactly ``mode``, whatever the umask
    return Path(final)


def write_text_atomic(text: str, final: str | Path, *, mode: int | None = None) -> Path:
    """UTF-8 text version of :func:`write_bytes_atomic`."""
    return write_bytes_atomic(text.encode("utf-8"), final, mode=mode)


def _plain(obj: Any) -> Any:
    """Default for ``json.dumps``: numpy values and arrays as plain numbers, anything else as text."""
    return obj.tolist() if hasattr(obj, "tolist") else str(obj)


def write_json_atomic(obj: Any, final: str | Path, *, mode: int | None = None) -> Path:
    """``json.dumps(obj, indent=2)`` written atomically (numpy values become plain JSON numbers)."""
    return write_text_atomic(json.dumps(obj, indent=2, default=_plain) + "\n", final, mode=mode)


def write_parquet_atomic(table: Any, final: str | Path, **options: Any) -> Path:
    """Write a pyarrow table to ``final`` atomically (zstd unless ``compression=`` is given)."""
    import pyarrow.parquet as pq

    options.setdefault("compression", "zstd")
    with atomic_path(final) as tmp:
        pq.write_table(table, tmp, **options)
    return Path(final)


def replace_dir(final: str | Path, build: Callable[[Path], None]) -> Path:
    """Build a directory with ``build(tmp_dir)``, fsync it, then swap it in for ``final``.

    A crash leaves the old directory, the new one, or (between the two renames) ``<final>.old``
    beside a missing ``final``: :func:`recover_dir` puts that back.
    """
    final = Path(final)
    tmp, old = final.with_name(f"{final.name}.tmp"), final.with_name(f"{final.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def recover_dir(final: str | Path) -> Path:
    """Undo a crash between :func:`replace_dir`'s two renames (``<final>.old`` left, ``final`` gone)."""
    final = Path(final)
    old = final.with_name(f"{final.name}.old")
    if not final.exists() and old.exists():
        os.replace(old, final)
    return final
