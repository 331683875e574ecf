"""Shared helpers for the benchmarks: data location, machine description, child-process runs."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# the shared spine MRI beside the checkout; EXTREMEAUG_DATA names another folder (e.g. a copy on a GPU server)
DATA = Path(os.environ.get("EXTREMEAUG_DATA") or REPO.parent / "shared" / "data")
sys.path.insert(0, str(REPO))


def require_data(folder: str) -> Path:
    """The shared data folder, or exit with a clear reason."""
    path = DATA / folder
    if not path.is_dir():
        sys.exit(f"skipped: {path} not found (the shared spine MRI is needed for this benchmark)")
    return path


def machine() -> str:
    """One line naming the machine the figures come from (the engine's own description)."""
    from ExtremeAugLogic.experiments.grid import machine_description

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
    env = dict(os.environ, PYTHONPATH=str(REPO))
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


def run_measured_child(cmd: list, log_path: Path) -> dict:
    """Run a command to its end with its output in ``log_path``; wall time and the peak resident
    memory of that one child (MiB, its VmHWM polled by the engine's ``run_measured``).
    Raises RuntimeError with the log's tail if it fails."""
    from ExtremeAugLogic.experiments.machine import run_measured

    run = run_measured([str(c) for c in cmd], Path(log_path))
    if run["returncode"] != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed (exit {run['returncode']}): {run['error']}")
    return run


def run_plain_script(train: list[str], predict: list[str], minutes, data: Path, work: Path, name: str,
                     seed=0, device: str = "cpu") -> tuple[dict, list[Path], dict]:
    """Train ``benchmarks/plain_monai.py`` on the ``train`` cases of ``data`` and predict ``predict``.

    Writes ``<name>.log`` and ``<name>.json`` and one ``<case>_pred.nii.gz`` per predicted case in
    ``work``; returns the script's result object, the prediction paths and the child's measurement.
    """
    outputs = [work / f"{case}_pred.nii.gz" for case in predict]
    result = work / f"{name}.json"
    pairs = [data / f"{case}_{kind}.nii.gz" for case in train for kind in ("image", "label")]
    cmd = [sys.executable, REPO / "benchmarks" / "plain_monai.py", "--train", *pairs, "--minutes", minutes,
           "--seed", seed, "--device", device, "--predict", *[data / f"{case}_image.nii.gz" for case in predict],
           "--output", *outputs, "--json", result]
    child = run_measured_child(cmd, work / f"{name}.log")
    return json.loads(result.read_text()), outputs, child
