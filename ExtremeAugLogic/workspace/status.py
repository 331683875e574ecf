"""The training status file: one JSON object rewritten atomically every couple of seconds.

The Slicer panel (or anyone) polls it; a reader never sees a half-written file. A background
thread keeps rewriting it even while the trainer is busy with a long step (preparing data,
validating), so ``updated_at`` shows the process is alive.
"""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from ExtremeAugLogic import contract
from ExtremeAugLogic.workspace import atomic

PHASES = contract.PHASES
FINAL_PHASES = contract.FINAL_PHASES


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_status(path: str | os.PathLike) -> dict | None:
    """The last status written, or None when there is none (or it cannot be parsed)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class StatusReporter:
    """Holds the live status and writes it to ``path`` every ``interval`` seconds."""

    def __init__(self, path: str | os.PathLike, interval: float = 2.0, **fields):
        self.path = Path(path)
        self.interval = interval
        self._lock = threading.Lock()
        self._state = {"phase": "starting", "iteration": 0, "total": None, "loss": None,
                       "val_dice": None, "eta_s": None, "version": None, "error": None,
                       "pid": os.getpid(), "started_at": now_iso(), "updated_at": now_iso(),
                       "message": ""}
        self._state.update(fields)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-writer", daemon=True)
        self.write()
        self._thread.start()

    def update(self, write: bool = False, **fields) -> None:
        """Change fields; ``write=True`` writes at once (phase changes do too)."""
        with self._lock:
            phase_changed = "phase" in fields and fields["phase"] != self._state["phase"]
            self._state.update(fields)
        if write or phase_changed:
            self.write()

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self._state)

    def write(self) -> None:
        with self._lock:
            self._state["updated_at"] = now_iso()
            state = dict(self._state)
        try:
            atomic.write_json(self.path, state)
        except OSError:
            pass  # a full disk must not kill training; the next write tries again

    def close(self, **fields) -> None:
        """Write the final state and stop the background writer."""
        self._stop.set()
        self._thread.join(timeout=self.interval + 1)
        self.update(write=True, **fields)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.write()


def format_eta(seconds: float | None) -> str:
    """'2m05s' style text for a number of seconds."""
    if seconds is None:
        return "?"
    seconds = int(max(0, seconds))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def wait_until(path, predicate, timeout: float, poll: float = 0.2) -> dict | None:
    """Poll the status file until ``predicate(status)`` holds (console and test use only)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = read_status(path)
        if status is not None and predicate(status):
            return status
        time.sleep(poll)
    return read_status(path)
