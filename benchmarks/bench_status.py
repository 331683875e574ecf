"""Status file latency: from starting ``train`` to its first ``status.json``, and the update interval.

    python benchmarks/bench_status.py [--quick] [--seconds 15] [--out docs/results/bench-status.md]

Starts ``python -m ExtremeAugLogic train`` on vb01 (the phantom when the shared data is absent)
with a budget longer than the watch, polls ``status.json`` every 10 ms: the latency to its first
write, to the phase "training" and to the first iteration; then, for ``--seconds``, every change
of the file (mtime) and of its ``updated_at``; finally it sends SIGTERM and measures how long the
process takes to stop with a checkpoint (phase "stopped"). The contract (docs/architecture.md):
the file is rewritten every ~2 s, also while a long step (loading, validation) runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import REPO, engine, machine, publish
from bench_aug import load_case

QUICK_SETTINGS = {"inplane_size": 64, "patch_size": 64, "stride": 32, "base_features": 4, "depth": 3,
                  "max_features": 32, "batch_size": 4}
POLL_S = 0.01


def read(path: Path):
    try:
        return path.stat().st_mtime_ns, json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--seconds", type=float, default=None, help="how long to watch the updates (default 15; 5 quick)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="write a markdown snippet here")
    args = parser.parse_args()

    import os

    from ExtremeAugLogic.workspace import Workspace

    watch = args.seconds or (5.0 if args.quick else 15.0)
    settings = QUICK_SETTINGS if args.quick else {}
    work = Path(tempfile.mkdtemp(prefix="bench-status-"))
    case, source = load_case(args.quick)
    ws = Workspace.create(work / "ws")
    ws.add_case(case.image, case.label, case_id=case.case_id, split="train")
    status = ws.status_path
    sets = [x for k, v in settings.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    cmd = engine("train", ws.path, "--quiet", "--minutes", "30", "--device", args.device, *sets)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = training_at = iteration_at = None
    changes, stamps, phases = [], [], []
    last_mtime = last_stamp = None
    try:
        deadline = None
        while True:
            now = time.monotonic()
            if proc.poll() is not None:
                raise SystemExit(f"training ended early: {proc.stderr.read()[-2000:]}")
            mtime, state = read(status)
            if state is not None:
                if first is None:
                    first = now - start
                    deadline = now + watch
                if mtime != last_mtime:
                    changes.append(now - start)
                    last_mtime = mtime
                if state.get("updated_at") != last_stamp:
                    stamps.append((now - start, state.get("updated_at")))
                    last_stamp = state.get("updated_at")
                if not phases or phases[-1][1] != state.get("phase"):
                    phases.append((now - start, state.get("phase")))
                if training_at is None and state.get("phase") == "training":
                    training_at = now - start
                if iteration_at is None and (state.get("iteration") or 0) > 0:
                    iteration_at = now - start
            if deadline is not None and now >= deadline and iteration_at is not None:
                break
            if deadline is not None and now >= deadline + 120:
                break  # no iteration within two minutes: report what was seen
            time.sleep(POLL_S)
        iteration = (read(status)[1] or {}).get("iteration")
        stop_sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        stop_s = time.monotonic() - stop_sent
        final = read(status)[1] or {}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    intervals = [b - a for a, b in zip(changes, changes[1:])]
    lines = ["# Training status file: latency and update interval", "",
             f"- machine: {machine()}",
             f"- command: `python benchmarks/bench_status.py{' --quick' if args.quick else ''}`",
             f"- data: {source}; device {args.device}; polled every {POLL_S * 1000:.0f} ms"
             + (f"; quick settings {settings}" if settings else ""), "",
             "| measure | seconds |", "|---|---|",
             f"| start of `train` -> first status.json write | {first:.2f} |",
             f"| start -> phase \"training\" | {_fmt(training_at)} |",
             f"| start -> first iteration reported | {_fmt(iteration_at)} |",
             f"| interval between rewrites (median over {len(intervals)}) | {_fmt(statistics.median(intervals) if intervals else None)} |",
             f"| longest interval between rewrites | {_fmt(max(intervals) if intervals else None)} |",
             f"| SIGTERM -> process ended (phase {final.get('phase')!r}, iteration {final.get('iteration')}) | {stop_s:.2f} |",
             "", "Phases seen: " + ", ".join(f"{p} at {t:.1f} s" for t, p in phases)
             + f"; {len(stamps)} distinct updated_at values (1 s resolution) and {len(changes)} rewrites in "
             f"{changes[-1] - changes[0] if len(changes) > 1 else 0:.1f} s; iteration {iteration} when stopped.",
             f"Target: a rewrite every ~2 s (contract), first write well before the scan is loaded; stop within a few "
             f"seconds with phase 'stopped'."]
    report = "\n".join(lines) + "\n"
    publish(report, args.out)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
