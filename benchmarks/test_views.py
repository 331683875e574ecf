"""The test-time views (the 2D recipe's ``test_views``) scored on models a ``generalisation.py --keep`` run left behind.

    python benchmarks/test_views.py RESULTS.json /tmp/generalisation-ours-vb01-* ... --out docs/results/x.md

Each kept model predicts its run's validation scans once per view (the five of ``views.VIEW_SETS``),
and every named set is scored on the mean of its views' probabilities, labelled with the model's
own rule: the same models for every set, so the comparison is paired and the training noise is
out of it. A set's prediction time is its views' network time plus preprocessing and labelling.
Several results files (one per seed) can be given in turn with their folders: runs are keyed
by seed and training scan, and a run already in ``--out``'s ``.json`` is not scored again.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from common import machine, require_data
from generalisation import SETS

SHIFTED = 0.2  # a pair whose per-structure Dice is below this while binary is above 0.5 has its levels shifted


def score_views(folder: Path, run: dict, data: Path, labels: list[int], device_name: str) -> dict:
    """{set: {scan: {binary_dice, mean_dice, predict_s}}} of one kept run's model."""
    import SimpleITK as sitk

    from ExtremeAugLogic.devices import resolve_device
    from ExtremeAugLogic.evaluation import dice_scores
    from ExtremeAugLogic.inference import DEFAULT_MIN_COMPONENT_FRACTION, labels_from_probabilities, load_model
    from ExtremeAugLogic.recipes.slice2d import preprocess
    from ExtremeAugLogic.recipes.slice2d.views import VIEW_SETS
    from ExtremeAugLogic.workspace import Workspace
    from ExtremeAugLogic.workspace.imageio import case_spacing_zyx, read_image, read_label

    device = resolve_device(device_name)
    recipe, config, model, _ = load_model(Workspace.open(folder / "ws"), run["version"], device)
    if config.get("structure_order") is None and config.settings.get("objects") not in (None, "off", "per-object"):
        print(f"{folder.name}: no structure order in the model's config", file=sys.stderr)
    rule = config.settings.get("objects", "off")
    views = sorted({v for vs in VIEW_SETS.values() for v in vs})
    out = {name: {} for name in VIEW_SETS}
    for case in run["validation_cases"]:
        image = read_image(data / f"{case}_image.nii.gz")
        reference = sitk.GetArrayFromImage(read_label(data / f"{case}_label.nii.gz", reference=image))  # a copy: a view dies with the image
        start = time.perf_counter()
        stack = recipe.preprocess(config, image)
        slices = recipe.input_channels(config.settings, stack.image)
        prep_s = time.perf_counter() - start
        single, seconds = {}, {}
        for view in views:
            start = time.perf_counter()
            single[view] = recipe.slice_probabilities(model, config, slices, device, views=(view,))
            seconds[view] = time.perf_counter() - start
        for name, members in VIEW_SETS.items():
            start = time.perf_counter()
            mean = np.mean([single[v] for v in members], axis=0) if len(members) > 1 else single[members[0]]
            probabilities = preprocess.from_slices(mean, stack.geometry)
            labelled = labels_from_probabilities(probabilities, config, rule, DEFAULT_MIN_COMPONENT_FRACTION,
                                                 case_spacing_zyx(image))
            label_s = time.perf_counter() - start
            dice = dice_scores(labelled, reference, labels)
            out[name][case] = {"binary_dice": dice["binary_dice"], "mean_dice": dice["mean_dice"],
                               "predict_s": round(prep_s + sum(seconds[v] for v in members) + label_s, 2)}
    return out


def summary(runs: dict, name: str) -> dict:
    pairs = [(key, case, s) for key, run in runs.items() for case, s in run["sets"][name].items()]
    off = {(key, case): s for key, run in runs.items() for case, s in run["sets"]["off"].items()}
    binary = [s["binary_dice"] for _, _, s in pairs]
    worst = min(pairs, key=lambda p: p[2]["binary_dice"])

    def moved(metric: str, sign: int) -> int:
        return sum(sign * (s[metric] - off[(k, c)][metric]) > 0.01 for k, c, s in pairs)

    return {"binary": float(np.mean(binary)), "per_structure": float(np.mean([s["mean_dice"] for _, _, s in pairs])),
            "worst": (worst[0], worst[1], worst[2]["binary_dice"]),
            "shifted": sum(s["mean_dice"] < SHIFTED and s["binary_dice"] > 0.5 for _, _, s in pairs),
            "binary_better": moved("binary_dice", 1), "binary_worse": moved("binary_dice", -1),
            "structure_better": moved("mean_dice", 1), "structure_worse": moved("mean_dice", -1),
            "predict_s": float(np.mean([s["predict_s"] for _, _, s in pairs])), "pairs": len(pairs)}


def render(results: dict) -> str:
    from ExtremeAugLogic.recipes.slice2d.views import VIEW_SETS

    runs = results["runs"]
    names = list(VIEW_SETS)
    lines = ["# Test-time views on kept models", "",
             f"- machine: {results['machine']}",
             f"- command: `{results['command']}`",
             "- models: " + "; ".join(sorted({r['source'] for r in runs.values()})),
             "- sets (angle in degrees, scale): " + "; ".join(
                 f"{n} {', '.join(f'({a:g}, {s:g})' for a, s in VIEW_SETS[n])}" for n in names),
             f"- the same models for every set; a pair counts as shifted when its per-structure Dice is below "
             f"{SHIFTED} with binary above 0.5; better / worse: by more than 0.01 against `off`", "",
             "| seed | training scan | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for key in sorted(runs, key=lambda k: (runs[k]["seed"], runs[k]["train_case"])):
        run = runs[key]
        cells = []
        for name in names:
            scores = run["sets"][name].values()
            cells.append(f"{np.mean([s['binary_dice'] for s in scores]):.3f} / "
                         f"{np.mean([s['mean_dice'] for s in scores]):.3f}")
        lines.append(f"| {run['seed']} | {run['train_case']} | " + " | ".join(cells) + " |")
    seeds = sorted({r["seed"] for r in runs.values()})
    groups = [(f"seed {s}", {k: r for k, r in runs.items() if r["seed"] == s}) for s in seeds]
    if len(seeds) > 1:
        groups.append(("all seeds", runs))
    for title, group in groups:
        stats = {n: summary(group, n) for n in names}
        lines.append(f"| **{title}** | mean ({stats['off']['pairs']} pairs) | "
                     + " | ".join(f"**{stats[n]['binary']:.3f} / {stats[n]['per_structure']:.3f}**" for n in names) + " |")
        lines.append(f"| | worst pair (binary) | " + " | ".join(
            f"{stats[n]['worst'][2]:.3f} ({stats[n]['worst'][0].split('/')[-1]} -> {stats[n]['worst'][1]})" for n in names) + " |")
        lines.append("| | pairs with levels shifted | " + " | ".join(str(stats[n]["shifted"]) for n in names) + " |")
        lines.append("| | binary better / worse | " + " | ".join(
            f"{stats[n]['binary_better']} / {stats[n]['binary_worse']}" for n in names) + " |")
        lines.append("| | per structure better / worse | " + " | ".join(
            f"{stats[n]['structure_better']} / {stats[n]['structure_worse']}" for n in names) + " |")
        lines.append("| | prediction s per scan | " + " | ".join(f"{stats[n]['predict_s']:.1f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a generalisation.py results file (.json)")
    parser.add_argument("work", type=Path, nargs="+", help="work folders kept by generalisation.py --keep")
    parser.add_argument("--out", type=Path, required=True, help="the report (.md; its .json beside it)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    source = json.loads(args.results.read_text())
    cfg = source["config"]
    seed = int(cfg.get("seed", 0))
    data = require_data(SETS[cfg["set"]]["folder"])
    labels = sorted(int(k) for k in cfg["names"])
    out_json = args.out.with_suffix(".json")
    command = "python benchmarks/test_views.py " + shlex.join(sys.argv[1:] if argv is None else map(str, argv))
    results = json.loads(out_json.read_text()) if out_json.is_file() else {"runs": {}, "commands": []}
    results["machine"] = machine()
    if command not in results["commands"]:
        results["commands"].append(command)
    results["command"] = "`; `".join(results["commands"])
    for folder in args.work:
        match = re.match(r"generalisation-ours-(.+?)-[^-]+$", folder.name)
        run = source["runs"].get(f"ours/{match.group(1)}") if match else None
        if run is None or not (folder / "ws").is_dir():
            sys.exit(f"{folder}: not a kept 'ours' work folder of a run in {args.results}")
        key = f"seed{seed}/{run['train_case']}"
        if key in results["runs"]:
            continue
        sets = score_views(folder, run, data, labels, args.device)
        results["runs"][key] = {"seed": seed, "train_case": run["train_case"], "source": str(args.results.name),
                                "iterations": run.get("iterations"), "sets": sets}
        original = {c: s["binary_dice"] for c, s in run["scores"].items()}
        drift = max(abs(sets["off"][c]["binary_dice"] - original[c]) for c in original)
        print(f"{key}: " + ", ".join(f"{n} {np.mean([s['binary_dice'] for s in v.values()]):.3f} / "
                                     f"{np.mean([s['mean_dice'] for s in v.values()]):.3f}" for n, v in sets.items())
              + f" (off against the run's own scores: at most {drift:.4f} apart)", flush=True)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(out_json)
        args.out.write_text(render(results))
    args.out.write_text(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
