"""Training throughput of the 2D model and the time to a usable model from one scan.

    python benchmarks/bench_training.py [--quick] [--out docs/results/bench-training.md]
        [--devices cpu cuda] [--budgets 10] [--skip-usable]

1. Throughput: patches per second of the engine's training step (sample a batch on the fly,
   forward, loss, backward, Adam step) with the default 2D settings on vb01, per device
   (mixed precision on CUDA as in training), and the share of the step spent sampling.
2. Time to a usable model: a workspace with vb01 for training and vb11..vb15 as its validation
   split; ``python -m ExtremeAugLogic train`` with a wall-clock budget (default 10 min on CPU,
   1 min on CUDA). The engine validates at 25/50/75% of the budget (on 2 validation scans,
   mean per-structure Dice) and at the end (all 5 scans); ``log.csv`` gives the Dice against
   training seconds. Usable = mean binary validation Dice >= 0.8. ``--budgets 2 4 6 8 10``
   trains one fresh model per budget instead and reports the smallest budget that is usable.
Targets: a usable model from one scan in < 10 min on CPU, < 1 min on an H100.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import tempfile
import time
from pathlib import Path


from common import DATA, engine, machine, publish
from bench_aug import load_case

USABLE_DICE = 0.8
TARGET_MINUTES = {"cpu": 10.0, "cuda": 1.0}
QUICK_SETTINGS = {"inplane_size": 64, "patch_size": 64, "stride": 32, "base_features": 4, "depth": 3,
                  "max_features": 32, "batch_size": 4}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def throughput(case, device: str, seconds: float, settings: dict) -> dict:
    """Patches per second of the training step, and the sampling share, on ``device``."""
    import SimpleITK as sitk
    import torch

    from ExtremeAugLogic.recipes.slice2d.recipe import Recipe2D
    from ExtremeAugLogic.devices import autocast

    recipe = Recipe2D(dict(settings))
    num_classes = int(sitk.GetArrayViewFromImage(case.label).max()) + 1
    config = recipe.fit_config([case], num_classes)
    torch.manual_seed(0)
    model = recipe.build_model(config).to(device)
    optimizer, _ = recipe.optimizer(model, config)
    loss_fn = recipe.loss_function(config)
    sampler = recipe.make_sampler(config, [case], device, 0)
    model.train()

    def step(i):
        x, y = sampler.batch(i)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        return x.shape[0]

    for i in range(2):  # warm-up
        step(i)
    _sync(device)
    count, steps, start = 0, 0, time.perf_counter()
    while True:
        count += step(steps)
        steps += 1
        if steps % 2 == 0:
            _sync(device)
            if time.perf_counter() - start >= seconds:
                break
    _sync(device)
    elapsed = time.perf_counter() - start
    sample_start = time.perf_counter()
    for i in range(steps):
        sampler.batch(i)
    _sync(device)
    sampling = time.perf_counter() - sample_start
    return {"patches_per_s": count / elapsed, "steps": steps, "seconds": elapsed, "step_ms": 1000 * elapsed / steps,
            "sampling_share": sampling / elapsed, "batch": recipe.settings["batch_size"],
            "parameters": sum(p.numel() for p in model.parameters())}


def make_workspace(folder: Path, train: list, validate: list):
    from ExtremeAugLogic.workspace import Workspace

    ws = Workspace.create(folder)
    for case_id, image, label in train:
        ws.add_case(image, label, case_id=case_id, split="train")
    for case_id, image, label in validate:
        ws.add_case(image, label, case_id=case_id, split="validation")
    return ws


def data_sets(quick: bool, work: Path):
    """([(id, image, label)] for training, same for validation, description)."""
    folder = DATA / "spine-vb"
    val_ids = [f"vb{i}" for i in range(11, 16)]
    if not quick and all((folder / f"{c}_image.nii.gz").is_file() for c in ["vb01"] + val_ids):
        files = lambda c: (c, str(folder / f"{c}_image.nii.gz"), str(folder / f"{c}_label.nii.gz"))  # noqa: E731
        return [files("vb01")], [files(c) for c in val_ids], "vb01 -> vb11..vb15 (shared spine MRI)"
    from ExtremeAugLogic.demo import phantom
    from ExtremeAugLogic.workspace.imageio import write_image

    shape = (48, 48, 16) if quick else (224, 224, 77)
    out = []
    for seed in (1, 2, 3):
        image, label = phantom.make_phantom(seed, shape=shape, spacing=(4.0, 4.0, 4.0) if quick else (1.0, 1.0, 1.0))
        paths = (f"phantom{seed}", str(work / f"phantom{seed}_image.nii.gz"), str(work / f"phantom{seed}_label.nii.gz"))
        write_image(image, paths[1])
        write_image(label, paths[2])
        out.append(paths)
    return out[:1], out[1:], f"phantom {shape}: 1 training, 2 validation"


def usable_run(work: Path, name: str, train, validate, device: str, budget: list, settings: dict) -> dict:
    """Train in a fresh workspace with validation cases; the Dice timeline and the final scores."""
    from ExtremeAugLogic.experiments.machine import run_measured
    from ExtremeAugLogic.workspace import Workspace

    ws = make_workspace(work / name, train, validate)
    sets = [x for k, v in settings.items() for x in ("--set", f"{k}={_json(v)}")]
    cmd = engine("train", ws.path, "--quiet", "--device", device, *budget, *sets)
    measured = run_measured(cmd, ws.path / "train.log")
    if measured["returncode"] != 0:
        raise SystemExit(f"training failed: {(ws.path / 'train.log').read_text()[-2000:]}")
    record = Workspace.open(ws.path).versions()[-1]
    with open(ws.model_dir(record["name"]) / "log.csv") as handle:
        rows = [r for r in csv.DictReader(handle)]
    by_iteration = {}  # the engine may log a validated iteration twice; keep its last row
    for r in rows:
        if r["val_dice"] not in ("", "nan") and not math.isnan(float(r["val_dice"])):
            by_iteration[int(r["iteration"])] = (float(r["seconds"]), int(r["iteration"]), float(r["val_dice"]))
    timeline = [by_iteration[k] for k in sorted(by_iteration)]
    scores = record.get("val_scores") or {}
    return {"wall_s": measured["wall_s"], "peak_rss_mib": measured["peak_rss_mib"],
            "train_seconds": float(record.get("seconds") or 0), "iterations": int(record.get("iterations") or 0),
            "timeline": timeline, "final_binary": scores.get("binary_dice"), "final_mean": scores.get("mean_dice"),
            "settings": record.get("settings", {})}


def _json(value) -> str:
    import json

    return json.dumps(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (phantom, tiny model)")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    parser.add_argument("--seconds", type=float, default=None, help="throughput measurement time (default 20)")
    parser.add_argument("--budgets", nargs="+", type=float, default=None,
                        help="minutes per usable-model run (default: 10 on CPU, 1 on CUDA; one run each)")
    parser.add_argument("--skip-usable", action="store_true", help="throughput only")
    parser.add_argument("--out", help="write a markdown snippet here")
    args = parser.parse_args()

    import torch

    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    seconds = args.seconds or (2.0 if args.quick else 20.0)
    settings = dict(QUICK_SETTINGS) if args.quick else {}
    case, source = load_case(args.quick)
    lines = ["# Training throughput and time to a usable model (2D model, default settings)", "",
             f"- machine: {machine()}",
             f"- command: `python benchmarks/bench_training.py{' --quick' if args.quick else ''}"
             + (f" --devices {' '.join(args.devices)}" if args.devices else "")
             + (f" --budgets {' '.join(f'{b:g}' for b in args.budgets)}" if args.budgets else "") + "`",
             f"- throughput data: {source}; torch threads {torch.get_num_threads()}"
             + (f"; quick settings {settings}" if settings else ""), "",
             "| device | patches/s | ms per step | batch | sampling share of the step | parameters |",
             "|---|---|---|---|---|---|"]
    for device in devices:
        t = throughput(case, device, seconds, settings)
        lines.append(f"| {device} | {t['patches_per_s']:.1f} | {t['step_ms']:.0f} | {t['batch']} | "
                     f"{100 * t['sampling_share']:.1f}% | {t['parameters']:,} |")
    print("\n".join(lines), file=sys.stderr, flush=True)
    if not args.skip_usable:
        work = Path(tempfile.mkdtemp(prefix="bench-training-"))
        train, validate, description = data_sets(args.quick, work)
        lines += ["", f"Time to a usable model (mean binary validation Dice >= {USABLE_DICE}): {description}; "
                  "validation cases in the workspace, so the engine validates during the budget (its time counts); "
                  f"workspaces kept in {work}.", ""]
        for device in devices:
            budgets = args.budgets or [TARGET_MINUTES.get(device.split(":")[0], 10.0)]
            target = None if args.quick else TARGET_MINUTES.get(device.split(":")[0])
            usable_budgets = []
            for minutes in budgets:
                budget = ["--iterations", "4"] if args.quick else ["--minutes", f"{minutes:g}"]
                r = usable_run(work, f"ws-{device.replace(':', '')}-{minutes:g}", train, validate, device, budget, settings)
                first = next(((s, it, d) for s, it, d in r["timeline"][:-1] if d >= USABLE_DICE), None)
                usable = r["final_binary"] is not None and r["final_binary"] >= USABLE_DICE
                if usable:
                    usable_budgets.append(minutes)
                lines += [f"**{device}, budget {'4 iterations' if args.quick else f'{minutes:g} min'}**: "
                          f"{r['iterations']} iterations in {r['train_seconds']:.0f} s of training "
                          f"({r['wall_s']:.0f} s wall with start-up and the final validation), peak memory "
                          f"{r['peak_rss_mib'] or float('nan'):.0f} MiB; final validation Dice on all "
                          f"{len(validate)} scans: binary {_fmt(r['final_binary'])}, per-structure {_fmt(r['final_mean'])} "
                          f"-> {'USABLE' if usable else 'not usable'}.", "",
                          "| training s | iteration | validation Dice (per-structure mean; 2 scans during training, all at the end) |",
                          "|---|---|---|"]
                lines += [f"| {s:.0f} | {it} | {d:.3f} |" for s, it, d in r["timeline"]]
                if first:
                    lines += ["", f"First checkpoint at >= {USABLE_DICE} (per-structure, stricter than binary): "
                              f"{first[0]:.0f} s ({first[0] / 60:.1f} min)."]
                lines.append("")
            if usable_budgets:
                best = min(usable_budgets)
                verdict = (f"usable with a {best:g} min budget"
                           + ("" if target is None else f" (target < {target:g} min: {'met' if best <= target else 'missed'})"))
            else:
                verdict = "not usable within the budgets tried" + ("" if target is None else f" (target < {target:g} min: missed)")
            lines.append(f"=> {device}: {verdict}")
            print("\n".join(lines[-1:]), file=sys.stderr, flush=True)
    report = "\n".join(lines) + "\n"
    publish(report, args.out)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
