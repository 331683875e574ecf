"""Shared helpers for the benchmarks: data location, machine description, child-process runs."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"


def require_data(folder: str) -> Path:
    """The shared data folder, or exit with a clear reason."""
    path = DATA / folder
    if not path.is_dir():
        sys.exit(f"skipped: {path} not found (the shared spine MRI is needed for this benchmark)")
    return path


def machine() -> str:
    """One line naming the machine the figures come from (the engine's own description)."""
    from ExtremeAugLogic.experiments.machine import machine_description

    return machine_description()


def publish(report: str, out: str | None) -> None:
    """Print a markdown report and write it to ``out`` when given."""
    print(report)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(report)


def engine(*args) -> list[str]:
    return [sys.executable, "-m", "ExtremeAugLogic", *map(str, args)]


def run_child(cmd: list[str]) -> dict:
    """Run a command; wall time and the peak resident memory of that child (MiB)."""
    env = dict(os.environ)
    start = time.monotonic()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    completed = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {completed.stderr.strip()[-2000:]}")
    # ru_maxrss of children is the max over all children so far: only meaningful when it grew
    return {"wall_s": wall, "peak_rss_mib": peak / 1024 if peak > before else None,
            "stdout": completed.stdout}
