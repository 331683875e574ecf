"""What every measurement reports beside its figures: the machine, and a child's time and memory."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Callable, Optional

import torch

from ExtremeAugLogic import launcher


def machine_description() -> str:
    """One line naming the machine: CPU model, cores, RAM, GPU, torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    try:
        mem = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        mem = "RAM unknown"
    return f"{cpu}, {os.cpu_count()} cores, {mem}, {gpu}, torch {torch.__version__}, {platform.system()}"


def run_measured(cmd: list, log_path: Optional[Path] = None, poll_s: float = 0.5,
                 env: Optional[dict] = None, on_poll: Optional[Callable] = None) -> dict:
    """Run ``cmd`` through the engine's launcher to its end; exit code, wall time, peak memory (MiB).

    Output goes to ``log_path`` (stdout) and the same name with ``.err.log`` (stderr); the
    peak is the child's VmHWM polled every ``poll_s``. Ctrl+C here stops the child's tree
    with SIGTERM first (the engine then checkpoints). ``error`` is the child's last word.
    """
    prefix = Path(log_path).with_suffix("") if log_path else None
    measured = launcher.runToEnd([str(c) for c in cmd], prefix, pollSeconds=poll_s, env=env, onPoll=on_poll)
    process = measured.pop("process")
    measured["error"] = process.lastError() if measured["returncode"] else ""
    return measured
