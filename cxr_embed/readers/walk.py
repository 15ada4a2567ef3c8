"""Walk a source folder safely: every entry is either a file to read or a recorded skip, never a crash.

Why not ``os.walk``/``rglob``: a symlink loop raises (or recurses forever), a FIFO named ``a.png``
makes any later ``open`` hang, a symlink can pull files from outside the folder the user named,
and a file name that is not valid UTF-8 crashes the store when it is written. Here the walk never
opens a file: it classifies entries with ``lstat``/``stat`` only, follows a symlink only when its
target stays inside the source (or ``follow_symlinks=True``), remembers each folder's
(device, inode) so a loop is listed once, and returns the rest as :class:`Skipped` with a reason
that names no path (reasons may reach a de-identified store).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Skipped:
    """An entry that is not read: ``stage`` ("symlink", "special_file", "unreadable") and why."""

    path: Path
    stage: str
    reason: str


@dataclass
class Walk:
    """Regular files (sorted per folder, hidden entries left out) and the entries skipped."""

    files: list[Path] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def walk(root: Path, *, follow_symlinks: bool = False, limit: int | None = None) -> Walk:
    """List ``root`` recursively (see the module docstring); stop after ``limit`` files when given."""
    out = Walk()
    base = Path(os.path.realpath(root))
    for item in _entries(base, base, follow_symlinks, set()):
        if isinstance(item, Skipped):
            out.skipped.append(item)
            continue
        out.files.append(item)
        if limit is not None and len(out.files) >= limit:
            break
    return out


def _entries(folder: Path, base: Path, follow: bool, seen: set[tuple[int, int]]) -> Iterator[Path | Skipped]:
    try:
        info = os.stat(folder)
        seen.add((info.st_dev, info.st_ino))
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        yield Skipped(folder, "unreadable", f"folder cannot be listed ({exc.strerror or type(exc).__name__})")
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        try:
            kind = _classify(entry, base, follow)
        except OSError as exc:
            yield Skipped(path, "unreadable", f"cannot be inspected ({exc.strerror or type(exc).__name__})")
            continue
        if isinstance(kind, Skipped):
            yield kind
        elif kind == "file":
            yield path
        else:  # a folder, real or (allowed) symlinked
            target = os.stat(path)
            if (target.st_dev, target.st_ino) in seen:
                yield Skipped(path, "symlink", "symlink loop: this folder is already being listed")
                continue
            yield from _entries(path, base, follow, seen)


def _classify(entry: os.DirEntry, base: Path, follow: bool) -> str | Skipped:
    """ "file", "dir" or a Skipped; opens nothing."""
    path = Path(entry.path)
    if entry.is_symlink():
        try:
            target = Path(os.path.realpath(path, strict=True))
        except OSError:
            return Skipped(path, "symlink", "broken symlink or symlink loop (its target cannot be reached)")
        inside = target == base or base in target.parents
        if not inside and not follow:
            return Skipped(path, "symlink", "symlink to outside the source folder: not followed (pass "
                                            "--follow-symlinks to follow it)")  # fmt: skip
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode) and not follow:
            return Skipped(path, "symlink", "symlinked folder: not followed, so no file is listed twice (pass "
                                            "--follow-symlinks to follow it)")  # fmt: skip
    elif entry.is_dir(follow_symlinks=False):  # d_type from the directory listing: no stat per file
        return "dir"
    elif entry.is_file(follow_symlinks=False):
        return "file"
    else:
        mode = entry.stat(follow_symlinks=False).st_mode
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    kind = (
        "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device or other special file"
    )
    return Skipped(path, "special_file", f"a {kind}, not a regular file: never opened")


def utf8_name(path: Path | str) -> bool:
    """True when ``path`` is valid UTF-8 (Parquet strings must be); False for surrogate-escaped bytes."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def display_name(path: Path | str) -> str:
    """``path`` as a storable string: undecodable bytes shown as ``\\xNN`` escapes (lossy, for messages)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")
