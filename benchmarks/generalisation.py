"""The cross-scan protocol: train from one scan, segment every other scan; ours against plain MONAI.

    python benchmarks/generalisation.py --set vb            # vb01 vb04 vb07 vb10 vb13, each -> the 14 others
    python benchmarks/generalisation.py --set ivd           # ivd11, ivd20, ivd25, each -> the 2 others
    python benchmarks/generalisation.py --set vb --minutes 2 --set-option level=20 --label level20

For every training scan and every method, one model is trained from that scan alone with the
same wall-clock budget, then every validation scan is segmented and scored:

- ours: ``python -m ExtremeAugLogic init/add/train`` in a fresh temporary workspace (the training
  scan only, ``--split train``), ``--set-option`` pairs passed to ``train`` as ``--set``; the
  validation scans are predicted with the engine's ``predict_file`` in this process (the CLI's
  default post-processing included), so that no prediction pays for a Python start-up;
- baseline: ``benchmarks/plain_monai.py`` (a plain MONAI 2D UNet recipe, see its docstring) in a
  child process that trains and then predicts the validation scans, saving nothing else.

The two never run at the same time. Figures per validation scan: binary Dice (all structures
as one), Dice per structure and their mean (over the structures in the reference), HD95 (mm)
and prediction time; per training run: iterations, wall time from process start to trained
model, and the peak resident memory of the training process up to that point.

Results go to ``--json`` after every run (rerun the same command to continue: finished
(method, training scan) runs are skipped); the markdown report (``--out``) and a box plot
(the report's name with ``.png``) are rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import REPO, engine, machine, require_data, run_measured_child, run_plain_script

SETS = {
    "vb": {"folder": "spine-vb", "train": ["vb01", "vb04", "vb07", "vb10", "vb13"],
           "names": {i: f"L{i}" for i in range(1, 6)}},
    "ivd": {"folder": "spine-ivd", "train": None,  # None: every scan of the set
            "names": None},  # filled from one_scan.IVD_NAMES
}
METHODS = ("ours", "baseline")
QUICK_IVD = ["ivd11"]
# must match between a results file and the run that continues it
CONFIG_KEYS = ("set", "minutes", "iterations", "seed", "device", "set_options", "validate_cases", "unlabeled")


def structure_names(name: str) -> dict:
    if name == "ivd":
        from one_scan import IVD_NAMES

        return dict(IVD_NAMES)
    return dict(SETS[name]["names"])


def cases_in(data: Path) -> list[str]:
    """Case ids with both an image and a label in ``data``, sorted."""
    return sorted(p.name[: -len("_image.nii.gz")] for p in data.glob("*_image.nii.gz")
                  if (data / p.name.replace("_image.nii.gz", "_label.nii.gz")).is_file())


def default_minutes() -> float:
    from ExtremeAugLogic.training import DEFAULT_MINUTES_CPU

    return DEFAULT_MINUTES_CPU


def validation_for(train_case: str, all_cases: list[str], chosen: list[str] | None) -> list[str]:
    """The scans a model trained on ``train_case`` is scored on: ``chosen`` (default: the whole set), minus itself."""
    return [c for c in (chosen or all_cases) if c != train_case]


# ---------------------------------------------------------------- the unlabeled worklist hook

def worklist_supported() -> bool:
    """Whether the engine's ``add`` accepts a scan without ``--label`` (its usage shows ``[--label ...]``)."""
    help_text = subprocess.run(engine("add", "--help"), capture_output=True, text=True,
                               env=_engine_env()).stdout
    return re.search(r"\[--label\b", help_text) is not None


def add_worklist(workspace: Path, cases: list[str], data: Path) -> None:
    """Add ``cases`` to ``workspace`` as unlabeled scans (the worklist); used only with ``--unlabeled``."""
    if not worklist_supported():
        raise RuntimeError("--unlabeled: this engine has no worklist support yet ('python -m ExtremeAugLogic add "
                           "--help' shows --label as required); run without --unlabeled")
    for case in cases:
        run_measured_child(engine("add", workspace, "--image", data / f"{case}_image.nii.gz", "--case-id", case),
                           workspace.parent / "add.log")


def _engine_env() -> dict:
    from ExtremeAugLogic.launcher import engineEnvironment

    return engineEnvironment()


# ---------------------------------------------------------------- scoring

def score(prediction, reference, labels: list[int]) -> dict:
    """Dice (binary, per structure, mean) and HD95 of one prediction (path, image or array), engine's evaluation."""
    from ExtremeAugLogic.evaluation import dice_scores, hausdorff95
    from ExtremeAugLogic.workspace.imageio import case_spacing_zyx, read_label

    ref = read_label(reference) if isinstance(reference, (str, Path)) else reference
    pred = read_label(prediction, reference=ref, reference_name=str(reference), allow_empty=True) \
        if isinstance(prediction, (str, Path)) else prediction
    dice = dice_scores(pred, ref, labels)
    hd = hausdorff95(pred, ref, labels=labels, spacing=case_spacing_zyx(ref))
    present = [lab for lab in labels if hd[lab] is not None and lab in _present(ref)]
    return {"binary_dice": dice["binary_dice"], "mean_dice": dice["mean_dice"],
            "per_structure": {str(k): v for k, v in dice["per_structure"].items()},
            "hd95_mm": {str(k): v for k, v in hd.items()},
            "mean_hd95_mm": float(np.mean([hd[k] for k in present])) if present else None,
            "hd95_undefined": sum(1 for k in labels if hd[k] is None)}


def _present(reference) -> set:
    import SimpleITK as sitk

    return {int(v) for v in np.unique(sitk.GetArrayViewFromImage(reference)) if v}


# ---------------------------------------------------------------- the two methods

def score_version(ws: Path, version: str, train_case: str, validate: list[str], device_name: str, data: Path,
                  labels: list[int]):
    """(config, scores with the model's own rule, {rule: {scan: Dice}}) of a trained workspace version.

    One probability map per scan; every rule that turns probabilities into labels is scored on it.
    """
    import SimpleITK as sitk

    from ExtremeAugLogic.devices import resolve_device
    from ExtremeAugLogic.evaluation import dice_scores
    from ExtremeAugLogic.inference import (DEFAULT_MIN_COMPONENT_FRACTION, OBJECT_RULES, labels_from_probabilities,
                                           load_model, to_label_image)
    from ExtremeAugLogic.inference.level_range import LevelGuide
    from ExtremeAugLogic.workspace import Workspace
    from ExtremeAugLogic.workspace.imageio import case_spacing_zyx, read_image, read_label

    workspace = Workspace.open(ws)
    device = resolve_device(device_name)
    recipe, config, model, _ = load_model(workspace, version, device)
    default_rule = config.settings.get("objects", "off")
    # the training scan registered onto each scan: where its first and last levels land (level_range);
    # the rules with "+range" drop the objects well beyond them, the default does when the model asks
    train_image = read_image(data / f"{train_case}_image.nii.gz")
    order = config.get("structure_order")
    guide = LevelGuide([(train_image, read_label(data / f"{train_case}_label.nii.gz", reference=train_image))],
                       order) if order else None
    guided = config.settings.get("level_range", "off") == "registration"
    range_rules = [rule for rule in ("ordered", "ordered-split") if guide]
    scores, by_rule = {}, {rule: {} for rule in [*OBJECT_RULES, *(f"{r}+range" for r in range_rules)]}
    for case in validate:
        image = read_image(data / f"{case}_image.nii.gz")
        reference = read_label(data / f"{case}_label.nii.gz", reference=image)
        start = time.perf_counter()
        probabilities = recipe.predict_probabilities(model, config, image, device)
        spacing = case_spacing_zyx(image)
        level_range = guide.range_for(image) if guide and guided else None
        labels_default = labels_from_probabilities(probabilities, config, default_rule, DEFAULT_MIN_COMPONENT_FRACTION,
                                                   spacing, level_range)
        seconds = time.perf_counter() - start
        scores[case] = {**score(to_label_image(labels_default, image), reference, labels), "predict_s": round(seconds, 2)}
        if guide and not guided:
            level_range = guide.range_for(image)
        for rule in by_rule:
            base, _, ranged = rule.partition("+")
            labelled = labels_from_probabilities(probabilities, config, base, DEFAULT_MIN_COMPONENT_FRACTION, spacing,
                                                 level_range if ranged else None)
            dice = dice_scores(labelled, sitk.GetArrayViewFromImage(reference), labels)
            by_rule[rule][case] = {"binary_dice": dice["binary_dice"], "mean_dice": dice["mean_dice"]}
    return config, scores, by_rule


def run_ours(train_case: str, validate: list[str], args, data: Path, work: Path, labels: list[int]) -> dict:
    ws, log = work / "ws", work / "engine.log"
    names = {str(k): v for k, v in structure_names(args.set).items()}
    run_measured_child(engine("init", ws, "--names", json.dumps(names)), log)
    run_measured_child(engine("add", ws, "--image", data / f"{train_case}_image.nii.gz", "--label",
                              data / f"{train_case}_label.nii.gz", "--case-id", train_case, "--split", "train"), log)
    if args.unlabeled:
        add_worklist(ws, validate, data)
    options = [x for kv in args.set_option for x in ("--set", kv)]
    budget = ("--iterations", args.iterations) if args.iterations else ("--minutes", args.minutes)
    training = run_measured_child(engine("train", ws, *budget, "--quiet", "--seed", args.seed,
                                         "--device", args.device, *options), log)
    version = json.loads((ws / "extremeaug.json").read_text())["versions"][-1]
    if version.get("status") != "done":
        raise RuntimeError(f"ours on {train_case}: version {version['name']} ended {version.get('status')}")
    config, scores, by_rule = score_version(ws, version["name"], train_case, validate, args.device, data, labels)
    return {"iterations": int(version.get("iterations") or 0), "train_loop_s": version.get("seconds"),
            "train_wall_s": round(training["wall_s"], 2), "peak_rss_mib": _round(training["peak_rss_mib"]),
            "version": version["name"],
            "settings": {k: version["settings"].get(k) for k in ("level", "slice_axis", "patch_size", "batch_size")},
            "scores": scores, "objects_rule": config.settings.get("objects", "off"),
            "structure_order": config.get("structure_order"),
            "scores_by_objects_rule": by_rule}


def run_baseline(train_case: str, validate: list[str], args, data: Path, work: Path, labels: list[int]) -> dict:
    launched = time.time()
    info, outputs, child = run_plain_script([train_case], validate, args.minutes, data, work, "baseline",
                                            seed=args.seed, device=args.device)
    scores = {}
    for case, out, p in zip(validate, outputs, info["predictions"]):
        scores[case] = {**score(out, data / f"{case}_label.nii.gz", labels), "predict_s": p["predict_s"]}
        out.unlink()
    return {"iterations": info["iterations"], "train_loop_s": info["train_loop_s"],
            "train_wall_s": round(info["train_end_unix"] - launched, 2),
            "peak_rss_mib": _round(info["peak_rss_train_mib"]),
            "child_peak_rss_mib": _round(child["peak_rss_mib"]), "child_wall_s": round(child["wall_s"], 2),
            "scores": scores}


RUNNERS = {"ours": run_ours, "baseline": run_baseline}


def _round(value, digits=1):
    return None if value is None else round(float(value), digits)


# ---------------------------------------------------------------- results file

def load_results(path: Path, config: dict) -> dict:
    if not path.is_file():
        return {"benchmark": "generalisation", "config": config, "runs": {}}
    results = json.loads(path.read_text())
    old = results.get("config", {})
    differs = {k: (old.get(k), config[k]) for k in CONFIG_KEYS if old.get(k) != config[k]}
    if differs:
        detail = "; ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in differs.items())
        sys.exit(f"{path}: made with other settings ({detail}); pass another --json/--out or delete it")
    results["config"] = {**old, **config}
    return results


def save_results(path: Path, results: dict) -> None:
    from ExtremeAugLogic.workspace import atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, results)


# ---------------------------------------------------------------- statistics and report

def _std(values) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def run_stats(run: dict) -> dict:
    scores = run["scores"]
    binary = {c: s["binary_dice"] for c, s in scores.items()}
    worst = min(binary, key=binary.get)
    hd = [s["mean_hd95_mm"] for s in scores.values() if s["mean_hd95_mm"] is not None]
    return {"binary": float(np.mean(list(binary.values()))), "std": _std(list(binary.values())),
            "per_structure": float(np.mean([s["mean_dice"] for s in scores.values()])),
            "worst": (worst, binary[worst]), "hd95": float(np.mean(hd)) if hd else None,
            "hd95_undefined": sum(s.get("hd95_undefined", 0) for s in scores.values()),
            "predict_s": float(np.mean([s["predict_s"] for s in scores.values()]))}


def method_summary(runs: dict) -> dict | None:
    """Over the training scans of one method: mean of the per-run means, worst pair, spread."""
    if not runs:
        return None
    stats = {case: run_stats(run) for case, run in runs.items()}
    means = [s["binary"] for s in stats.values()]
    pairs = [(case, val, s["binary_dice"]) for case, run in runs.items() for val, s in run["scores"].items()]
    worst = min(pairs, key=lambda p: p[2])
    hd = [s["hd95"] for s in stats.values() if s["hd95"] is not None]
    return {"binary": float(np.mean(means)), "per_structure": float(np.mean([s["per_structure"] for s in stats.values()])),
            "spread_std": _std(means), "min": min(means), "max": max(means), "worst": worst,
            "hd95": float(np.mean(hd)) if hd else None, "runs": len(runs), "pairs": len(pairs)}


def _f(value, fmt=".3f", none="-") -> str:
    return none if value is None else format(value, fmt)


def render(results: dict, command: str, png: Path | None) -> str:
    cfg = results["config"]
    names = {int(k): v for k, v in cfg["names"].items()}
    by_method = {m: {run["train_case"]: run for run in results["runs"].values() if run["method"] == m}
                 for m in cfg["methods"]}
    machines = sorted({run.get("machine", "?") for run in results["runs"].values()}) or [machine()]
    train_cases = cfg["train_cases"]
    lines = [f"# Cross-scan generalisation: {cfg['set']}, {cfg['label']}", "",
             f"- command: `{command}`",
             f"- machine: {'; '.join(machines)}",
             (f"- budget: {cfg['iterations']} iterations per training (exploration: immune to a busy machine, "
              f"not a wall-clock comparison); seed {cfg['seed']}, device {cfg['device']}" if cfg.get("iterations") else
              f"- budget: {cfg['minutes']:g} min wall clock per training, the same for both methods, one training at "
              f"a time; seed {cfg['seed']}, device {cfg['device']}"),
             f"- protocol: one model per training scan, trained from that scan alone ({', '.join(train_cases)}); "
             f"scored on {'every other scan of the set' if not cfg['validate_cases'] else ', '.join(cfg['validate_cases'])}"
             " (the training scan excluded)",
             f"- ours: `python -m ExtremeAugLogic train "
             + (f"--iterations {cfg['iterations']}`" if cfg.get("iterations") else f"--minutes {cfg['minutes']:g}`")
             + "".join(f" --set {o}" for o in cfg["set_options"])
             + (" with the other scans added as an unlabeled worklist" if cfg["unlabeled"] else "")
             + "; engine defaults otherwise, prediction with its default post-processing",
             "- baseline: `benchmarks/plain_monai.py`: percentile scaling, native sagittal slices, 128 px crops "
             "(half on foreground), MONAI UNet 2D (16-256 channels, 2 residual units), DiceCE, Adam 1e-3, batch 16, "
             "sliding-window prediction; no augmentation",
             "- Dice: binary = all structures as one; per-structure = the mean over the structures in the reference. "
             "HD95 in mm, the mean over the structures both maps have (n/a = a structure missing from the prediction, "
             "counted in the table). Train wall min: process start to trained model (ours: the whole `train` command, "
             "saving included; baseline: its process start to the end of its training loop); peak MiB: the training "
             "process's peak resident memory up to then. std: sample standard deviation.", ""]
    done = sum(len(r) for r in by_method.values())
    planned = len(cfg["methods"]) * len(train_cases)
    if done < planned:
        lines += [f"**Partial: {done} of {planned} training runs done.**", ""]
    for method in cfg["methods"]:
        runs = by_method[method]
        lines += [f"## {method}", "",
                  "| training scan | mean binary Dice | std | worst scan (binary) | mean per-structure Dice | "
                  "mean HD95 mm (n/a) | iterations | train wall min | peak MiB | predict s/scan |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for case in train_cases:
            if case not in runs:
                lines.append(f"| {case} | not run yet | | | | | | | | |")
                continue
            run, s = runs[case], run_stats(runs[case])
            lines.append(f"| {case} | {s['binary']:.3f} | {_f(s['std'])} | {s['worst'][0]} {s['worst'][1]:.3f} | "
                         f"{s['per_structure']:.3f} | {_f(s['hd95'], '.1f')} ({s['hd95_undefined']}) | "
                         f"{run['iterations']} | {run['train_wall_s'] / 60:.2f} | {_f(run['peak_rss_mib'], '.0f')} | "
                         f"{s['predict_s']:.1f} |")
        lines.append("")
    summaries = {m: method_summary(by_method[m]) for m in cfg["methods"]}
    lines += ["## Protocol summary", "",
              "| method | runs | pairs | mean binary Dice | mean per-structure Dice | spread: std of run means | "
              "run means min-max | worst pair (binary) | mean HD95 mm |", "|---|---|---|---|---|---|---|---|---|"]
    for method, s in summaries.items():
        if s is None:
            lines.append(f"| {method} | 0 | | | | | | | |")
            continue
        lines.append(f"| {method} | {s['runs']} | {s['pairs']} | **{s['binary']:.3f}** | {s['per_structure']:.3f} | "
                     f"{_f(s['spread_std'])} | {s['min']:.3f}-{s['max']:.3f} | "
                     f"{s['worst'][0]} -> {s['worst'][1]} {s['worst'][2]:.3f} | {_f(s['hd95'], '.1f')} |")
    labels = sorted(names)
    lines += ["", "Mean Dice per structure over all (training scan, validation scan) pairs:", "",
              "| method | " + " | ".join(names[k] for k in labels) + " |", "|---|" + "---|" * len(labels)]
    for method in cfg["methods"]:
        pairs = [s for run in by_method[method].values() for s in run["scores"].values()]
        if pairs:
            lines.append(f"| {method} | " + " | ".join(
                f"{np.mean([p['per_structure'][str(k)] for p in pairs]):.3f}" for k in labels) + " |")
    lines += _difference(by_method, train_cases)
    lines += _objects_rules(by_method.get("ours", {}))
    if png is not None and png.is_file():
        lines += ["", f"![binary Dice per method]({png.name})"]
    return "\n".join(lines) + "\n"


def _objects_rules(runs: dict) -> list[str]:
    """Ours, the same models and probabilities, with each rule that turns probabilities into labels."""
    known = ("off", "per-object", "ordered", "ordered-aligned", "ordered-largest", "ordered-split", "ordered+range",
             "ordered-split+range")
    rules = [r for r in known if all(r in run.get("scores_by_objects_rule", {}) for run in runs.values())]
    if not runs or not rules:
        return []
    lines = ["", "## Structure labels per object (ours, same models, same probabilities)", "",
             "off = voxel-wise argmax; per-object = one label per connected 3D object; ordered = per object and in the "
             "anatomical order the training label showed, its chain one object per level (from 2026-11-28: objects side by "
             "side are one level; with more levels than labels those cut by the scan's edge leave first, then the smallest, "
             "and those beyond the chain's ends are background; before, the largest objects); ordered-aligned = the same, "
             "its chain chosen among all large objects (in reports of 2026-11-27 04:00-04:40, ordered was the aligned "
             "rule and ordered-largest today's ordered); ordered-split = ordered after cutting each object as long as "
             "several structures (the training label's pitch) into as many; +range = the same after dropping the objects "
             "whose centroid lies more than 0.75 pitch beyond where the training scan's first and last structures "
             "land once it is rigidly registered onto the scan (inference.level_range). The gap binary - per-structure measures "
             "level errors; against ordered: pairs whose per-structure Dice is more than 0.01 higher / lower.", "",
             "| rule | mean binary Dice | mean per-structure Dice | gap | worst pair per-structure | against ordered |",
             "|---|---|---|---|---|---|"]
    ordered = {(tc, vc): s["mean_dice"] for tc, run in runs.items()
               for vc, s in run["scores_by_objects_rule"].get("ordered", {}).items()}
    for rule in rules:
        pairs = [(tc, vc, s) for tc, run in runs.items() for vc, s in run["scores_by_objects_rule"][rule].items()]
        binary = float(np.mean([s["binary_dice"] for _, _, s in pairs]))
        per = float(np.mean([s["mean_dice"] for _, _, s in pairs]))
        worst = min(pairs, key=lambda p: p[2]["mean_dice"])
        against = "-"
        if "ordered" in rules and rule != "ordered":
            diffs = [s["mean_dice"] - ordered[tc, vc] for tc, vc, s in pairs]
            against = f"{sum(d > 0.01 for d in diffs)} / {sum(d < -0.01 for d in diffs)}"
        lines.append(f"| {rule} | {binary:.3f} | {per:.3f} | {binary - per:.3f} | {worst[0]} -> {worst[1]} "
                     f"{worst[2]['mean_dice']:.3f} | {against} |")
    return lines


def _difference(by_method: dict, train_cases: list[str]) -> list[str]:
    if not all(m in by_method for m in METHODS):
        return []
    ours, base = by_method["ours"], by_method["baseline"]
    both = [c for c in train_cases if c in ours and c in base]
    lines = ["", "## Ours - baseline", ""]
    if not both:
        return lines + ["No training scan has both runs yet."]
    lines += ["| training scan | binary Dice | per-structure Dice | pairs ours better (binary) |", "|---|---|---|---|"]
    diffs_b, diffs_s, wins, total = [], [], 0, 0
    for case in both:
        so, sb = run_stats(ours[case]), run_stats(base[case])
        shared = [v for v in ours[case]["scores"] if v in base[case]["scores"]]
        better = sum(ours[case]["scores"][v]["binary_dice"] > base[case]["scores"][v]["binary_dice"] for v in shared)
        wins, total = wins + better, total + len(shared)
        diffs_b.append(so["binary"] - sb["binary"])
        diffs_s.append(so["per_structure"] - sb["per_structure"])
        lines.append(f"| {case} | {diffs_b[-1]:+.3f} | {diffs_s[-1]:+.3f} | {better}/{len(shared)} |")
    lines.append(f"| **mean** | **{np.mean(diffs_b):+.3f}** | **{np.mean(diffs_s):+.3f}** | {wins}/{total} |")
    return lines


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    data = {m: [s["binary_dice"] for run in results["runs"].values() if run["method"] == m
                for s in run["scores"].values()] for m in cfg["methods"]}
    data = {m: v for m, v in data.items() if v}
    if not data:
        return
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(data), 4))
    ax.boxplot(list(data.values()), showmeans=True)
    ax.set_xticks(range(1, len(data) + 1), [f"{m}\n(n={len(v)})" for m, v in data.items()])
    rng = np.random.default_rng(0)
    for i, values in enumerate(data.values(), start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(values)), values, s=10, alpha=0.5, color="k")
    ax.set_ylabel("binary Dice (training scan -> validation scan)")
    ax.set_ylim(0, 1)
    budget = f"{cfg['iterations']} iterations" if cfg.get("iterations") else f"{cfg['minutes']:g} min"
    ax.set_title(f"{cfg['set']}: {budget} per training, {cfg['label']}")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=sorted(SETS), default="vb")
    parser.add_argument("--train-cases", nargs="+", metavar="ID",
                        help="one model per scan (default: vb01 vb04 vb07 vb10 vb13; ivd: all three)")
    parser.add_argument("--validate-cases", nargs="+", metavar="ID",
                        help="scored scans (default: every scan of the set but the training scan)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="wall-clock budget per training, both methods (default: the engine's CPU default, 8)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="exploration only: an iteration budget for ours instead of minutes (no baseline)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--set-option", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe setting for ours, passed to train as --set (repeatable)")
    parser.add_argument("--label", help="name of this variant (default: 'defaults' or the options)")
    parser.add_argument("--unlabeled", action="store_true",
                        help="ours: add the validation scans as an unlabeled worklist (needs engine support)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="device for both methods (default cpu)")
    parser.add_argument("--out", help="markdown report (default docs/results/generalisation-<set>[-<label>].md)")
    parser.add_argument("--json", help="results file (default: the report's name with .json)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folders")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run, not a result: 0.2 min, the first training scan, two validation scans, "
                             "report in a temporary folder unless --out is given")
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes = args.minutes or 0.2
        first = args.train_cases or SETS[args.set]["train"] or QUICK_IVD
        args.train_cases = first[:1]
        if args.out is None:
            args.out = str(Path(tempfile.mkdtemp(prefix="generalisation-quick-")) / f"generalisation-{args.set}.md")
    if args.minutes is None:
        args.minutes = default_minutes()
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    if args.iterations is not None and (args.iterations <= 0 or "baseline" in args.methods):
        parser.error("--iterations must be positive and is for --methods ours only")
    for pair in args.set_option:
        if "=" not in pair or pair.startswith("="):
            parser.error(f"--set-option {pair}: expected KEY=VALUE")
    args.label = args.label or ("defaults" if not args.set_option and not args.unlabeled else
                                " ".join(args.set_option + (["unlabeled"] if args.unlabeled else [])))
    if args.out is None:
        slug = "" if args.label == "defaults" else "-" + re.sub(r"[^A-Za-z0-9.]+", "-", args.label).strip("-")
        args.out = str(REPO / "docs" / "results" / f"generalisation-{args.set}{slug}.md")
    if args.json is None:
        args.json = str(Path(args.out).with_suffix(".json"))
    return args


def _eta(seconds: float) -> str:
    minutes = int(round(seconds / 60))
    left = f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes} min"
    return f"~{left} left (done ~{time.strftime('%H:%M', time.localtime(time.time() + seconds))})"


def main(argv=None) -> int:
    args = parse_args(argv)
    spec = SETS[args.set]
    data = require_data(spec["folder"])
    all_cases = cases_in(data)
    train_cases = args.train_cases or spec["train"] or all_cases
    unknown = [c for c in train_cases + (args.validate_cases or []) if c not in all_cases]
    if unknown:
        sys.exit(f"{data}: no scan {', '.join(unknown)} (have {', '.join(all_cases)})")
    if args.quick and not args.validate_cases:
        args.validate_cases = validation_for(train_cases[0], all_cases, None)[:2]
    for case in train_cases:
        if not validation_for(case, all_cases, args.validate_cases):
            sys.exit(f"--validate-cases: nothing left to score a model trained on {case}")
    if args.unlabeled and "ours" in args.methods and not worklist_supported():
        sys.exit("--unlabeled: this engine has no worklist support yet ('python -m ExtremeAugLogic add --help' "
                 "shows --label as required); run without --unlabeled")
    names = structure_names(args.set)
    labels = sorted(names)
    command = "python benchmarks/generalisation.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    config = {"set": args.set, "minutes": args.minutes, "iterations": args.iterations, "seed": args.seed, "device": args.device,
              "set_options": list(args.set_option), "validate_cases": args.validate_cases,
              "unlabeled": args.unlabeled, "label": args.label, "methods": list(args.methods),
              "train_cases": list(train_cases), "names": {str(k): v for k, v in names.items()}, "command": command}
    json_path, out, png = Path(args.json), Path(args.out), Path(args.out).with_suffix(".png")

    from ExtremeAugLogic.errors import InputError
    from ExtremeAugLogic.workspace.locking import OwnerLock

    json_path.parent.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = OwnerLock(json_path.with_name(json_path.name + ".lock"), "this benchmark is already writing there")
        lock.__enter__()
    except InputError as exc:
        sys.exit(str(exc))
    try:
        results = load_results(json_path, config)
        # keep methods and training scans of earlier runs of this file in the report
        cfg = results["config"]
        cfg["methods"] = [m for m in METHODS if m in args.methods or any(
            r["method"] == m for r in results["runs"].values())]
        cfg["train_cases"] = list(dict.fromkeys(train_cases + [r["train_case"] for r in results["runs"].values()]))
        todo = [(case, m) for case in train_cases for m in args.methods if f"{m}/{case}" not in results["runs"]]
        skipped = len(train_cases) * len(args.methods) - len(todo)
        budget = f"{args.iterations} iterations" if args.iterations else f"{args.minutes:g} min"
        print(f"generalisation {args.set} ({args.label}): {len(todo)} training runs of {budget} to do"
              + (f", {skipped} already in {json_path}" if skipped else "") + f"; machine: {machine()}", flush=True)
        overhead = {"ours": [], "baseline": []}  # measured seconds beyond the budget, per validation scan count
        for k, (case, method) in enumerate(todo, start=1):
            validate = validation_for(case, all_cases, args.validate_cases)
            remaining = 0.0
            for c2, m2 in todo[k - 1:]:
                n = len(validation_for(c2, all_cases, args.validate_cases))
                extra = np.mean(overhead[m2]) if overhead[m2] else 30.0 + 8.0 * n
                remaining += args.minutes * 60 + extra
            print(f"[{k}/{len(todo)}] {method} {case}: train {budget}, then predict "
                  f"{len(validate)} scans; {_eta(remaining)}", flush=True)
            work = Path(tempfile.mkdtemp(prefix=f"generalisation-{method}-{case}-"))
            start = time.monotonic()
            try:
                record = RUNNERS[method](case, validate, args, data, work, labels)
            except RuntimeError as exc:
                sys.exit(f"{method} {case}: {exc}")
            finally:
                if not args.keep:
                    shutil.rmtree(work, ignore_errors=True)
            elapsed = time.monotonic() - start
            overhead[method].append(elapsed - args.minutes * 60)
            record.update({"method": method, "train_case": case, "validation_cases": validate,
                           "total_s": round(elapsed, 1), "machine": machine(),
                           "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")})
            results["runs"][f"{method}/{case}"] = record
            save_results(json_path, results)
            plot(results, png)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(render(results, command, png))
            s = run_stats(record)
            print(f"    {method} {case}: {record['iterations']} iterations, binary Dice {s['binary']:.3f} "
                  f"(worst {s['worst'][0]} {s['worst'][1]:.3f}), per-structure {s['per_structure']:.3f}, "
                  f"peak {_f(record['peak_rss_mib'], '.0f')} MiB, {elapsed / 60:.1f} min", flush=True)
        plot(results, png)
        report = render(results, command, png)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        print(report)
        print(f"wrote {out}, {png.name} and {json_path}")
    finally:
        lock.__exit__(None, None, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
