"""A pid file that lets one process at a time own a folder (a training, an experiment grid)."""

from __future__ import annotations

import os
from pathlib import Path

from ExtremeAugLogic import atomic
from ExtremeAugLogic.errors import InputError


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PidLock:
    """Context manager writing this pid to ``path``; refuses while another live pid holds it.

    A file left by a process that died is taken over. ``busy`` completes the message,
    e.g. "training is already running".
    """

    def __init__(self, path: str | os.PathLike, busy: str):
        self.path, self.busy = Path(path), busy

    def __enter__(self):
        other = self._holder()
        if other and other != os.getpid() and pid_alive(other):
            raise InputError(f"{self.path.parent}: {self.busy} (pid {other})")
        atomic.write_text(self.path, str(os.getpid()))
        return self

    def __exit__(self, *exc):
        if self._holder() == os.getpid():
            try:
                self.path.unlink()
            except OSError:
                pass

    def _holder(self) -> int:
        try:
            return int(self.path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0
