"""The writer lock: one process writes a store at a time, and a dead writer's lock is taken over.

``flock`` on ``<store>/.lock``: the kernel drops it when its holder dies (even by SIGKILL), so no
manual clean-up is ever needed, and the pid written into the file is only a hint for the message.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from cxr_embed.errors import StoreError, StoreLockedError
from cxr_embed.store.layout import LOCK_FILE, is_lock_busy, local_store_path, lock_error_holder

_HELD_LOCK_FDS: set[int] = set()


def _drop_inherited_locks() -> None:
    """In a forked child (DataLoader workers), close the parent's lock fds without unlocking.

    A flock belongs to the open file description, which fork shares: a decode worker that outlives
    its SIGKILLed parent for a moment would otherwise keep the store locked against the rerun.
    Closing the child's copy leaves the parent's lock intact (LOCK_UN here would release it).
    """
    for fd in _HELD_LOCK_FDS:
        os.close(fd)
    _HELD_LOCK_FDS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


class StoreLock:
    """The exclusive writer lock (``flock`` on ``<store>/.lock``), taken before any expensive work.

    The kernel drops it when its holder dies (even by SIGKILL), so a lock left by a killed run is
    taken over without manual clean-up. The job takes it before loading the model, so a second
    writer is refused in milliseconds rather than after a model load.
    """

    def __init__(self, path: str | Path):
        self.path = local_store_path(path)
        self.fd: int | None = None

    def acquire(self) -> StoreLock:
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} is a file, not a directory. Choose a new directory for the store.")
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / LOCK_FILE
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(
                f"Cannot open the store's lock file {lock} ({exc.strerror}): it must be a regular file; "
                "remove it if no cxr-embed process is writing the store."
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = lock_error_holder(fd)
            os.close(fd)
            if is_lock_busy(exc):
                raise StoreLockedError(
                    f"Store {self.path} is being written by {holder}. Wait for it to finish or stop it; the lock is "
                    "released automatically when that process exits."
                ) from None
            raise StoreError(f"Cannot lock {lock} ({exc.strerror}).") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        _HELD_LOCK_FDS.add(fd)
        return self

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self.fd is not None:
            _HELD_LOCK_FDS.discard(self.fd)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def __enter__(self) -> StoreLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
