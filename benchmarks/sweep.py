"""Several variants of the cross-scan protocol at once, one process per (variant, training scan).

For a machine with many cores and a GPU (the lent device machine): each run is one
``generalisation.py`` call with its own results file, ``--jobs`` of them at a time, training scans
in the outer order so that a run cut short by ``--deadline-min`` still leaves every variant
measured on the same first training scans. Then the runs of each variant are merged into one
results file and report, which ``compare_generalisation.py`` puts side by side.

    python benchmarks/sweep.py --variants benchmarks/sweep-variants.txt --out-dir /tmp/sweep \\
        --device cuda --jobs 10 --deadline-min 8
    python benchmarks/sweep.py --merge-only --out-dir /tmp/sweep    # merge what finished

A variants file holds one variant per line: ``label iterations [KEY=VALUE ...]`` (``#`` comments).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

DEFAULT_CASES = ["vb01", "vb07", "vb13", "vb04", "vb10"]


def read_variants(path: Path) -> list[dict]:
    variants = []
    for line in path.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) < 2 or not words[1].isdigit():
            sys.exit(f"{path}: '{line}': expected 'label iterations [KEY=VALUE ...]'")
        variants.append({"label": words[0], "iterations": int(words[1]), "options": words[2:]})
    return variants


def run_all(args, variants: list[dict]) -> None:
    runs_dir = args.out_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    todo = [(case, v) for case in args.train_cases for v in variants]
    deadline = time.monotonic() + args.deadline_min * 60
    running: list[tuple[subprocess.Popen, str]] = []  # each run writes its own log file
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    while todo or running:
        for proc, name in list(running):
            if proc.poll() is not None:
                running.remove((proc, name))
                print(f"{time.strftime('%H:%M:%S')} done {name} (rc {proc.returncode})", flush=True)
        if time.monotonic() > deadline:
            for proc, name in running:
                proc.kill()
                print(f"deadline: killed {name}", flush=True)
            print(f"deadline: {len(todo)} runs not started", flush=True)
            return
        while todo and len(running) < args.jobs:
            case, v = todo.pop(0)
            name = f"{v['label']}-{case}"
            cmd = [sys.executable, str(REPO / "benchmarks" / "generalisation.py"), "--set", args.set,
                   "--methods", "ours", "--train-cases", case, "--iterations", str(v["iterations"]),
                   "--device", args.device, "--label", v["label"], "--seed", str(args.seed),
                   "--out", str(runs_dir / f"{name}.md")]
            cmd += [x for opt in v["options"] for x in ("--set-option", opt)]
            with open(runs_dir / f"{name}.log", "w") as log:  # the child keeps its own copy of the handle
                running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), name))
            print(f"{time.strftime('%H:%M:%S')} start {name}", flush=True)
        time.sleep(2)


def merge(out_dir: Path) -> list[Path]:
    """One results file and report per variant from its per-training-scan files."""
    import generalisation

    by_label: dict[str, dict] = {}
    for path in sorted((out_dir / "runs").glob("*.json")):
        results = json.loads(path.read_text())
        label = results["config"]["label"]
        merged = by_label.setdefault(label, {**results, "runs": {}})
        merged["runs"].update(results["runs"])
        merged["config"]["train_cases"] = sorted({r["train_case"] for r in merged["runs"].values()})
    written = []
    for label, results in by_label.items():
        if not results["runs"]:
            continue
        out = out_dir / f"sweep-{label}.md"
        cases = " ".join(results["config"]["train_cases"])
        command = re.sub(r" --out \S+", "", re.sub(r"--train-cases \S+", f"--train-cases {cases}",
                                                    results["config"]["command"]))
        results["config"]["command"] = f"{command}  (one run per training scan, merged by benchmarks/sweep.py)"
        generalisation.save_results(out.with_suffix(".json"), results)
        out.write_text(generalisation.render(results, results["config"]["command"], None))
        written.append(out.with_suffix(".json"))
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", type=Path)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--set", default="vb")
    parser.add_argument("--train-cases", nargs="+", default=DEFAULT_CASES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    parser.add_argument("--deadline-min", type=float, default=60.0, help="kill what still runs after this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--merge-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.merge_only:
        if args.variants is None:
            parser.error("--variants is needed unless --merge-only")
        run_all(args, read_variants(args.variants))
    for path in merge(args.out_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
