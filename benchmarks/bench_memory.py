"""Peak resident memory of training at level 5 and level 50, on-the-fly and offline.

    python benchmarks/bench_memory.py [--quick] [--iterations 100] [--out docs/results/bench-memory.md]

Each training is ``python -m ExtremeAugLogic train`` in its own child process on vb01 (the
phantom when the shared data is absent), with its peak resident set size measured by polling
its VmHWM (and ``getrusage(RUSAGE_CHILDREN)`` where that child set a new maximum):

- on-the-fly: the default sampler, which draws transform k of base patch p from a hash, so
  nothing is stored per transform;
- offline: the paper's N-fold dataset written first with ``augment.write_offline_dataset``
  (base patches x N patches as .npy on disk, streamed), then trained with ``--set offline_dir``
  (memory-mapped; pages read count as resident while the kernel keeps them).
The claim: on-the-fly memory does not depend on the level; offline disk (and page cache)
grows with N.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from common import engine, machine, publish
from bench_aug import load_case

QUICK_SETTINGS = {"inplane_size": 64, "patch_size": 64, "stride": 32, "base_features": 4, "depth": 3,
                  "max_features": 32, "batch_size": 4}


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def write_offline(case, settings: dict, level: int, folder: Path) -> dict:
    """The N-fold dataset of ``case`` as the engine's sampler would draw it (same seed, same centres)."""
    import SimpleITK as sitk
    import torch

    from ExtremeAugLogic.recipes.slice2d import augment
    from ExtremeAugLogic.recipes.slice2d.recipe import Recipe2D

    recipe = Recipe2D(dict(settings))
    s = recipe.settings
    config = recipe.fit_config([case], int(sitk.GetArrayViewFromImage(case.label).max()) + 1)
    images, labels, centres = recipe.training_slices(config, [case], seed=0)
    start = time.perf_counter()
    info = augment.write_offline_dataset(torch.from_numpy(images), torch.from_numpy(labels)[:, None],
                                         centres, level, augment.AugmentationRanges.from_settings(s), folder,
                                         s["patch_size"], seed=0, padding=s["padding"])
    return {"samples": info["samples"], "base_patches": len(centres), "seconds": time.perf_counter() - start,
            "bytes": folder_size(folder)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (tiny model, few iterations)")
    parser.add_argument("--iterations", type=int, default=None, help="iterations per training (default 100; 3 quick)")
    parser.add_argument("--levels", nargs="+", type=int, default=[5, 50])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="write a markdown snippet here")
    args = parser.parse_args()

    from ExtremeAugLogic.experiments.machine import run_measured
    from ExtremeAugLogic.workspace import Workspace

    iterations = args.iterations or (3 if args.quick else 100)
    settings = dict(QUICK_SETTINGS) if args.quick else {}
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    case, source = load_case(args.quick)
    ws = Workspace.create(work / "ws")
    ws.add_case(case.image, case.label, case_id=case.case_id, split="train")
    sets = [x for k, v in settings.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    base = engine("train", ws.path, "--quiet", "--iterations", iterations, "--device", args.device, *sets)
    rows = []
    try:
        for level in args.levels:
            run = run_measured(base + ["--level", str(level)], work / "train.log")
            if run["returncode"] != 0:
                raise SystemExit(f"training failed: {(work / 'train.log').read_text()[-2000:]}")
            rows.append(("on-the-fly", level, run, None))
        for level in args.levels:
            folder = work / f"offline-L{level}"
            written = write_offline(case, settings, level, folder)
            run = run_measured(base + ["--level", str(level), "--set", f"offline_dir={json.dumps(str(folder))}"],
                               work / "train.log")
            if run["returncode"] != 0:
                raise SystemExit(f"training failed: {(work / 'train.log').read_text()[-2000:]}")
            rows.append(("offline", level, run, written))
            shutil.rmtree(folder, ignore_errors=True)  # level 50 of a full scan is gigabytes
    finally:
        shutil.rmtree(work, ignore_errors=True)
    onthefly = {level: run["peak_rss_mib"] for mode, level, run, _ in rows if mode == "on-the-fly"}
    offline = {level: run["peak_rss_mib"] for mode, level, run, _ in rows if mode == "offline"}
    lo, hi = min(args.levels), max(args.levels)
    lines = ["# Peak training memory against the augmentation level", "",
             f"- machine: {machine()}",
             f"- command: `python benchmarks/bench_memory.py{' --quick' if args.quick else ''}"
             + (f" --iterations {args.iterations}" if args.iterations else "") + "`",
             f"- data: {source}; {iterations} iterations per training on {args.device}, each training its own "
             "process; default 2D settings" + (f" with quick settings {settings}" if settings else ""), "",
             "| mode | level | peak resident memory MiB | training wall s | offline dataset on disk | written in s |",
             "|---|---|---|---|---|---|"]
    for mode, level, run, written in rows:
        disk = "-" if written is None else f"{written['bytes'] / 2 ** 20:.0f} MiB ({written['samples']} patches)"
        wrote = "-" if written is None else f"{written['seconds']:.1f}"
        lines.append(f"| {mode} | {level} | {run['peak_rss_mib'] or float('nan'):.0f} | {run['wall_s']:.1f} | {disk} | {wrote} |")
    ratio = onthefly[hi] / onthefly[lo] if onthefly.get(lo) and onthefly.get(hi) else float("nan")
    off_ratio = offline[hi] / offline[lo] if offline.get(lo) and offline.get(hi) else float("nan")
    lines += ["", f"On-the-fly peak at level {hi} / level {lo}: **{ratio:.3f}** "
              f"({'independent of the level (within 5%)' if abs(ratio - 1) <= 0.05 else 'DEPENDS on the level'}; "
              f"target: independent); offline: {off_ratio:.3f}. The offline dataset grows linearly with the level on "
              "disk; its memory-mapped pages count as resident only as far as training has read them."]
    report = "\n".join(lines) + "\n"
    publish(report, args.out)


if __name__ == "__main__":
    main()
