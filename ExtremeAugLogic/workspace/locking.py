"""Locks on files in a workspace: the manifest lock and the one-owner lock of a training.

Both are ``flock`` locks (``msvcrt`` on Windows): the kernel releases them when their process
dies, so a killed trainer never leaves a stale lock behind, and two processes that start at
the same moment cannot both win. The lock file itself is never deleted (deleting a locked
file would let a third process lock a new file of the same name).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ExtremeAugLogic import contract
from ExtremeAugLogic.errors import InputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None
    import msvcrt

# A status reader takes the training lock shared for an instant (contract.lock_holder);
# an owner retries that long before it gives up.
_READER_GRACE_S = 0.5


def _try_lock(handle, shared: bool = False) -> bool:
    """Take the lock on ``handle`` without waiting; whether it was taken."""
    try:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        else:  # pragma: no cover - Windows
            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        return True
    except OSError:
        return False


def _unlock(handle) -> None:
    try:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        else:  # pragma: no cover - Windows
            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
    finally:
        handle.close()


def acquire_blocking(path: Path):
    """Open and exclusively lock ``path``, waiting as long as it takes; returns the handle."""
    handle = open(path, "a+b")
    try:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        else:  # pragma: no cover - Windows
            while not _try_lock(handle):
                time.sleep(0.05)
    except BaseException:
        handle.close()
        raise
    return handle


def try_acquire(path: Path):
    """Open and exclusively lock ``path`` if no other process holds it: the handle, else None."""
    handle = open(path, "a+b")
    if _try_lock(handle):
        return handle
    handle.close()
    return None


def release(handle) -> None:
    if handle is not None:
        _unlock(handle)


class OwnerLock:
    """Context manager: this process owns the folder of ``path`` (a training, an experiment grid).

    Refuses with one line (``busy`` completes it, e.g. "training is already running") while
    another live process holds the lock. The pid is written into the file for people and the
    Slicer panel while the lock is held; on exit the file gets back the bytes it had, so a
    command that was refused after taking the lock leaves it as it found it. Liveness comes
    from the lock itself (``contract.lock_holder``), never from the pid in the file.
    """

    def __init__(self, path: str | os.PathLike, busy: str):
        self.path, self.busy = Path(path), busy
        self._handle = None
        self._previous = b""

    def __enter__(self):
        handle = open(self.path, "a+b")
        deadline = time.monotonic() + _READER_GRACE_S
        while not _try_lock(handle):
            if time.monotonic() >= deadline:
                handle.close()
                holder = contract.lock_holder(self.path)
                who = f" (pid {holder})" if holder and holder > 0 else ""
                raise InputError(f"{self.path.parent}: {self.busy}{who}")
            time.sleep(0.02)
        handle.seek(0)
        self._previous = handle.read()
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()).encode())
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc):
        handle, self._handle = self._handle, None
        if handle is None:
            return
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(self._previous)
            handle.flush()
        except OSError:
            pass
        _unlock(handle)
