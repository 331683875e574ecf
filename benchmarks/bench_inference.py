"""Inference time for one 224x224x77 scan (vb11, or a phantom of that size; SimpleITK size 77 x 224 x 224), per device.

    python benchmarks/bench_inference.py [--quick] [--out docs/results/bench-inference.md]

A model with the default 2D settings is trained for a couple of iterations (the network's time
does not depend on the weights; the labelling after it is slower on such a model's noisy
probabilities than on a trained one's), then ``inference.predict_array`` (sliding windows, Gaussian
blending, speck removal) is timed in this process, with and without flip test-time
augmentation and with each set of test-time views (the 2D setting ``test_views``), and ``python -m ExtremeAugLogic predict`` end to end (start-up, reading, writing)
as the Slicer module runs it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import DATA, engine, machine, run_child, publish

QUICK_SETTINGS = {"inplane_size": 64, "patch_size": 64, "stride": 32, "base_features": 4, "depth": 3,
                  "max_features": 32, "batch_size": 4}


def scans(quick: bool, work: Path):
    """(training image, label, scan to predict, description)."""
    folder = DATA / "spine-vb"
    files = [folder / n for n in ("vb01_image.nii.gz", "vb01_label.nii.gz", "vb11_image.nii.gz")]
    if not quick and all(f.is_file() for f in files):
        return (*map(str, files), "vb11 (shared spine MRI)")
    from ExtremeAugLogic.demo import phantom
    from ExtremeAugLogic.workspace.imageio import write_image

    shape = (48, 48, 16) if quick else (224, 224, 77)
    paths = []
    for seed in (1, 2):
        image, label = phantom.make_phantom(seed, shape=shape)
        write_image(image, work / f"p{seed}_image.nii.gz")
        write_image(label, work / f"p{seed}_label.nii.gz")
        paths.append(work / f"p{seed}_image.nii.gz")
    return str(paths[0]), str(work / "p1_label.nii.gz"), str(paths[1]), f"phantom {shape}"


def _seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (small phantom, tiny model)")
    parser.add_argument("--repeats", type=int, default=None, help="timed predictions per device (default 3)")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    parser.add_argument("--out", help="write a markdown snippet here")
    args = parser.parse_args()

    import torch

    from ExtremeAugLogic.workspace.imageio import read_image
    from ExtremeAugLogic.inference import load_model, predict_array
    from ExtremeAugLogic.recipes.slice2d.views import VIEW_SETS
    from ExtremeAugLogic.workspace import Workspace

    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    repeats = args.repeats or (1 if args.quick else 3)
    work = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    train_image, train_label, target, description = scans(args.quick, work)
    ws = Workspace.create(work / "ws")
    ws.add_case(train_image, train_label, split="train")
    settings = QUICK_SETTINGS if args.quick else {}
    sets = [x for k, v in settings.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    run_child(engine("train", ws.path, "--quiet", "--iterations", "2", "--device", "cpu", *sets))
    image = read_image(target)
    size = image.GetSize()
    rows = []
    for device in devices:
        recipe, config, model, _ = load_model(ws, None, device)
        if not args.quick:
            predict_array(recipe, config, model, image, device)  # warm-up: kernels, allocator
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            labels = predict_array(recipe, config, model, image, device)
            times.append(time.perf_counter() - start)
        tta = _seconds(lambda: predict_array(recipe, config, model, image, device, tta=True))
        views = {}
        for name in VIEW_SETS:
            if name == "off":
                continue
            config.settings["test_views"] = name
            views[name] = statistics.median(_seconds(lambda: predict_array(recipe, config, model, image, device))
                                            for _ in range(repeats))
        config.settings["test_views"] = "off"
        out = work / f"pred-{device.replace(':', '')}.nii.gz"
        cli = run_child(engine("predict", ws.path, "--image", target, "--output", out, "--device", device))
        assert labels.shape == tuple(reversed(size))
        slices = recipe.preprocess(config, image).image.shape[0]
        rows.append((device, statistics.median(times), min(times), tta, views, cli["wall_s"], slices))
    lines = [f"# Inference time for one scan (2D model, default settings)", "",
             f"- machine: {machine()}",
             f"- command: `python benchmarks/bench_inference.py{' --quick' if args.quick else ''}`",
             f"- scan: {description}, size {size[0]} x {size[1]} x {size[2]}; model trained 2 iterations "
             f"(time does not depend on the weights); {repeats} timed run(s){'' if args.quick else ' after a warm-up'}; torch threads "
             f"{torch.get_num_threads()}" + (f"; quick settings {settings}" if settings else ""), "",
             "| device | predict_array median s | min s | slices/s | with flip TTA s | "
             + " | ".join(f"test_views {n} s" for n in VIEW_SETS if n != "off") + " | CLI predict wall s (start-up + I/O) |",
             "|---|---|---|---|---|" + "---|" * (len(VIEW_SETS) - 1) + "---|"]
    for device, median, best, tta, views, cli, slices in rows:
        lines.append(f"| {device} | {median:.2f} | {best:.2f} | {slices / median:.0f} | {tta:.2f} | "
                     + " | ".join(f"{v:.2f}" for v in views.values()) + f" | {cli:.1f} |")
    shutil.rmtree(work, ignore_errors=True)
    report = "\n".join(lines) + "\n"
    publish(report, args.out)


if __name__ == "__main__":
    main()
