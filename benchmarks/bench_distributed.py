"""Training on several processes (torchrun): throughput and time to the one-scan target, 1 against N.

    python benchmarks/bench_distributed.py [--quick] [--device cpu|cuda] [--processes 1 2]
        [--seconds 120] [--minutes 10] [--skip-target] [--out docs/results/bench-distributed.md]

The 2D model with its default settings, trained by the engine's own command line: ``python -m
ExtremeAugLogic train`` for 1 process, the same command under ``torchrun --standalone
--nproc-per-node N`` for N (``launcher.engineCommand(..., processes=N)``).

1. Throughput: vb01 alone in a fresh workspace (no validation split, so the loop only trains),
   ``--minutes seconds/60``; iterations per second and samples per second (iterations x
   batch_size per process x N / the training seconds recorded in ``version.json``), and the
   speed-up over 1 process.
2. Time to the one-scan target: vb01 for training, vb11..vb15 as the validation split,
   ``--minutes`` budget per N (default 10 on CPU, 1 on CUDA); the engine validates at 25/50/75%
   of the budget (2 scans, per-structure mean Dice) and at the end (all 5); the target is
   ``bench_training``'s (binary validation Dice >= 0.8 at the end; the first checkpoint at
   >= 0.8 per-structure is printed too).

On the CPU the processes share the cores: each of N processes gets cores/N threads
(``OMP_NUM_THREADS``), 1 process all of them. On CUDA one process per GPU (N at most the
number of GPUs). Without the shared data, a phantom of vb01's size stands in (stated in the
report). Run on an otherwise idle machine: anything else running distorts the comparison.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tempfile
from pathlib import Path

from common import REPO, machine, publish
from bench_training import QUICK_SETTINGS, TARGET_MINUTES, USABLE_DICE, data_sets, make_workspace

QUICK_SECONDS = 6.0


def train_command(ws: Path, processes: int, device: str, budget: list, settings: dict) -> list:
    from ExtremeAugLogic import launcher

    sets = [x for k, v in settings.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    return launcher.engineCommand(sys.executable, "train", ws, "--quiet", "--device", device, *budget, *sets,
                                  processes=processes)


def environment(processes: int, device: str) -> tuple[dict, str]:
    """The child's environment (threads per process on the CPU) and a note for the report."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if device != "cpu":
        env.pop("OMP_NUM_THREADS", None)
        return env, "one GPU per process"
    threads = max(1, (os.cpu_count() or 1) // processes)
    env["OMP_NUM_THREADS"] = str(threads)
    return env, f"{threads} thread(s) per process"


def run_training(ws: Path, processes: int, device: str, budget: list, settings: dict) -> dict:
    """Train once; the version's iterations, training seconds, batch and log rows."""
    from ExtremeAugLogic.experiments.machine import run_measured
    from ExtremeAugLogic.workspace import Workspace

    env, note = environment(processes, device)
    measured = run_measured(train_command(ws, processes, device, budget, settings), ws / "train.log", env=env)
    if measured["returncode"] != 0:
        raise SystemExit(f"training on {processes} process(es) failed: {measured['error']}")
    record = Workspace.open(ws).versions()[-1]
    with open(ws / "models" / record["name"] / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    return {"iterations": int(record.get("iterations") or 0), "seconds": float(record.get("seconds") or 0),
            "batch": int(record["settings"]["batch_size"]), "world_size": int(record.get("world_size", 1)),
            "wall_s": measured["wall_s"], "rows": rows, "scores": record.get("val_scores") or {}, "note": note}


def timeline(rows: list) -> list:
    """(training seconds, iteration, validation Dice) of the validated log rows."""
    by_iteration = {}
    for r in rows:
        if r["val_dice"] not in ("", "nan") and not math.isnan(float(r["val_dice"])):
            by_iteration[int(r["iteration"])] = (float(r["seconds"]), int(r["iteration"]), float(r["val_dice"]))
    return [by_iteration[k] for k in sorted(by_iteration)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (phantom, tiny model)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--processes", nargs="+", type=int, default=None,
                        help="process counts (default: 1 2 on the CPU, 1 .. the GPU count on CUDA)")
    parser.add_argument("--seconds", type=float, default=None, help="throughput budget per run (default 120)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="budget of the time-to-target runs (default 10 on CPU, 1 on CUDA)")
    parser.add_argument("--skip-target", action="store_true", help="throughput only")
    parser.add_argument("--out", help="write the markdown report here")
    args = parser.parse_args()

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("skipped: --device cuda but this machine has no CUDA GPU")
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    counts = args.processes or (list(range(1, gpus + 1)) if gpus else [1, 2])
    if gpus and max(counts) > gpus:
        sys.exit(f"--processes {max(counts)}: this machine has {gpus} GPU(s); one process per GPU")
    seconds = args.seconds or (QUICK_SECONDS if args.quick else 120.0)
    minutes = args.minutes or TARGET_MINUTES[args.device]
    settings = dict(QUICK_SETTINGS) if args.quick else {}
    work = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    train, validate, description = data_sets(args.quick, work)
    command = ("python benchmarks/bench_distributed.py" + (" --quick" if args.quick else "")
               + f" --device {args.device} --processes {' '.join(map(str, counts))}"
               + (f" --seconds {args.seconds:g}" if args.seconds else "")
               + (f" --minutes {args.minutes:g}" if args.minutes else "")
               + (" --skip-target" if args.skip_target else ""))
    quick = ", QUICK: not a result" if args.quick else ""
    lines = [f"# Training on 1 and several processes ({args.device}, 2D model{quick})",
             "", f"- machine: {machine()}", f"- command: `{command}`",
             f"- data: {description}" + (f"; quick settings {settings}" if settings else ""),
             "- a step of N processes trains on N x batch_size samples (batch_size per process); same learning rate", "",
             f"## Throughput ({seconds:g} s of training per run, training set only)", "",
             "| processes | iterations | training s | iterations/s | samples/s | speed-up (samples/s) | threads |",
             "|---|---|---|---|---|---|---|"]
    base = None
    for n in counts:
        ws = make_workspace(work / f"throughput-{n}", train, []).path
        r = run_training(ws, n, args.device, ["--minutes", f"{seconds / 60:g}"], settings)
        rate = r["iterations"] / max(r["seconds"], 1e-9)
        samples = rate * r["batch"] * r["world_size"]
        base = base or samples
        lines.append(f"| {n} | {r['iterations']} | {r['seconds']:.0f} | {rate:.2f} | {samples:.1f} | "
                     f"{samples / base:.2f}x | {r['note']} |")
        print(lines[-1], file=sys.stderr, flush=True)
    if not args.skip_target:
        budget = ["--iterations", "4"] if args.quick else ["--minutes", f"{minutes:g}"]
        per_run = "4 iterations" if args.quick else f"{minutes:g} min"
        lines += ["", f"## Time to the one-scan target ({per_run} per run)", "",
                  f"Target: binary validation Dice >= {USABLE_DICE} at the end (all {len(validate)} validation scans); "
                  f"the first validation during training at >= {USABLE_DICE} is per-structure on 2 scans.", "",
                  "| processes | iterations | samples seen | first validation >= target (s) | final binary Dice | "
                  "final per-structure Dice | wall s |", "|---|---|---|---|---|---|---|"]
        for n in counts:
            ws = make_workspace(work / f"target-{n}", train, validate).path
            r = run_training(ws, n, args.device, budget, settings)
            first = next((s for s, _, d in timeline(r["rows"])[:-1] if d >= USABLE_DICE), None)
            lines.append(f"| {n} | {r['iterations']} | {r['iterations'] * r['batch'] * r['world_size']} | "
                         f"{'-' if first is None else f'{first:.0f}'} | {_fmt(r['scores'].get('binary_dice'))} | "
                         f"{_fmt(r['scores'].get('mean_dice'))} | {r['wall_s']:.0f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", f"Workspaces (logs in each `train.log`) kept in {work}."]
    publish("\n".join(lines) + "\n", args.out)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
