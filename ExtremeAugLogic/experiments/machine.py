"""What every measurement reports beside its figures: the machine, and a child's time and memory."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Callable, Optional

import torch

from ExtremeAugLogic import launcher


def vector_extension(cpu_flags: str) -> str:
    """The widest x86 vector extension in a /proc/cpuinfo ``flags`` line ('' when neither).

    Hosts sold under one model name differ here: two 2-core "AMD EPYC" hosts ran the default 2D
    training at 4.2-4.6 and at 1.4 iterations per second, the slower one with AVX2 alone (the
    faster one's extension was not recorded then), so a report needs it to read its iterations.
    """
    flags = set(cpu_flags.split())
    if "avx512f" in flags:
        return "AVX-512"
    return "AVX2" if "avx2" in flags else ""


def machine_description() -> str:
    """One line naming the machine: CPU model and vector extension, cores, RAM, GPU, torch version."""
    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        flags = next((line.split(":", 1)[1] for line in lines if line.startswith("flags")), "")
        cpu = names[0] if names else cpu
        extension = vector_extension(flags)
        cpu = f"{cpu} ({extension})" if extension else cpu
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
