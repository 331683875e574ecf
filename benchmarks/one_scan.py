"""Train from one real scan with the default CPU budget; Dice on unseen scans, memory, time.

    python benchmarks/one_scan.py --set vb          # vb01 -> vb11..vb15
    python benchmarks/one_scan.py --set ivd         # ivd11 -> ivd20, ivd25

Prints a markdown report (and writes it with --out). Extra ``--set-option KEY=VALUE`` pairs
go to the recipe (used to measure alternatives such as the slice axis). ``--train`` and
``--validate`` pick other cases (several training scans give a learning curve);
``--method plain`` trains the plain MONAI script (``plain_monai.py``) on the same scans with
the same wall-clock budget instead of the engine (its prediction time is the script's own, without
the start of a process that the engine's ``predict`` includes).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from common import engine, machine, require_data, run_child, run_plain_script
from generalisation import score

SETS = {
    "vb": ("spine-vb", ["vb01"], ["vb11", "vb12", "vb13", "vb14", "vb15"], "L"),
    "ivd": ("spine-ivd", ["ivd11"], ["ivd20", "ivd25"], "D"),
}
IVD_NAMES = {1: "L5-S1", 2: "L4-L5", 3: "L3-L4", 4: "L2-L3", 5: "L1-L2"}


def evaluate_cases(workspace: Path, data: Path, cases: list[str], out: Path, labels: list[int]) -> dict:
    rows = {}
    for case in cases:
        pred = out / f"{case}_pred.nii.gz"
        timing = run_child(engine("predict", workspace, "--image", data / f"{case}_image.nii.gz", "--output", pred))
        rows[case] = {**score(pred, data / f"{case}_label.nii.gz", labels), "predict_s": timing["wall_s"]}
    return rows


def run_plain(train: list[str], validate: list[str], minutes: float, data: Path, work: Path,
              labels: list[int]) -> tuple[dict, int, dict]:
    """The plain MONAI script trained on ``train`` for ``minutes``: (training figures, iterations, per-case scores)."""
    info, outputs, child = run_plain_script(train, validate, minutes, data, work, "plain")
    rows = {case: {**score(out, data / f"{case}_label.nii.gz", labels), "predict_s": p["predict_s"]}
            for case, out, p in zip(validate, outputs, info["predictions"])}
    training = {"wall_s": info["train_loop_s"], "peak_rss_mib": info["peak_rss_train_mib"],
                "child_wall_s": child["wall_s"]}
    return training, info["iterations"], rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=sorted(SETS), default="vb")
    parser.add_argument("--minutes", type=float, default=None, help="training budget (default: the engine's)")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--model", default="2d")
    parser.add_argument("--method", choices=("ours", "plain"), default="ours",
                        help="the engine (default) or the plain MONAI script with the same budget")
    parser.add_argument("--train", nargs="+", help="training cases (default: the set's first)")
    parser.add_argument("--validate", nargs="+", help="validation cases (default: the set's last five or two)")
    parser.add_argument("--set-option", action="append", default=[], help="recipe setting KEY=VALUE")
    parser.add_argument("--out", help="write the markdown report here")
    parser.add_argument("--json", help="write the raw figures here")
    args = parser.parse_args()

    folder, train, validate, _ = SETS[args.set]
    train = args.train or train
    validate = args.validate or validate
    if set(train) & set(validate):
        parser.error(f"a case cannot both train and validate: {sorted(set(train) & set(validate))}")
    if args.method == "plain" and (args.iterations or args.set_option or args.model != "2d"):
        parser.error("--method plain takes --minutes only (no --iterations, --set-option or --model)")
    data = require_data(folder)
    names = IVD_NAMES if args.set == "ivd" else {i: f"L{i}" for i in range(1, 6)}
    work = Path(tempfile.mkdtemp(prefix=f"bench-{args.set}-"))
    started = time.strftime("%Y-%m-%d %H:%M")
    if args.method == "plain":
        from ExtremeAugLogic.training.trainer import DEFAULT_MINUTES_CPU

        training, iterations, rows = run_plain(train, validate, args.minutes or DEFAULT_MINUTES_CPU, data, work, list(names))
        settings = "benchmarks/plain_monai.py (percentile scaling, native slices, 128 px crops, batch 16)"
    else:
        ws = work / "ws"
        run_child(engine("init", ws))
        for case in train:
            run_child(engine("add", ws, "--image", data / f"{case}_image.nii.gz", "--label", data / f"{case}_label.nii.gz"))
        budget = (["--minutes", str(args.minutes)] if args.minutes else []) + (
            ["--iterations", str(args.iterations)] if args.iterations else [])
        options = [x for kv in args.set_option for x in ("--set", kv)]
        training = run_child(engine("train", ws, "--quiet", "--model", args.model, *budget, *options))
        version = json.loads((ws / "extremeaug.json").read_text())["versions"][-1]
        iterations, v = version.get("iterations"), version["settings"]
        settings = (f"level {v.get('level')}, slice axis {v.get('slice_axis')}, patch {v.get('patch_size')},"
                    f" batch {v.get('batch_size')}")
        rows = evaluate_cases(ws, data, validate, work, list(names))
    binary = float(np.mean([r["binary_dice"] for r in rows.values()]))
    mean = float(np.mean([r["mean_dice"] for r in rows.values()]))
    labels = sorted({int(k) for r in rows.values() for k in r["per_structure"]})  # the keys are str, as in JSON
    per_label = {lab: float(np.mean([r["per_structure"].get(str(lab), 0.0) for r in rows.values()])) for lab in labels}
    hd = [v for r in rows.values() for v in r["hd95_mm"].values() if v is not None]
    lines = [
        f"# One-scan benchmark: {', '.join(train)} -> {', '.join(validate)} "
        + ("(the plain MONAI script)" if args.method == "plain" else f"({args.model} model)"),
        "",
        f"- machine: {machine()}",
        f"- command: `python benchmarks/one_scan.py --set {args.set}"
        + (f" --minutes {args.minutes}" if args.minutes else "") + (f" --iterations {args.iterations}" if args.iterations else "")
        + (f" --model {args.model}" if args.model != "2d" else "") + (" --method plain" if args.method == "plain" else "")
        + (f" --train {' '.join(train)}" if args.train else "")
        + (f" --validate {' '.join(validate)}" if args.validate else "") + "".join(f" --set-option {o}" for o in args.set_option) + "`",
        f"- run: {started}; training wall time {training['wall_s'] / 60:.1f} min, {iterations} iterations,"
        f" peak resident memory {training['peak_rss_mib'] or float('nan'):.0f} MiB",
        f"- settings: {settings}",
        "",
        f"**Mean Dice, all structures as one: {binary:.3f}**; mean per-structure Dice: {mean:.3f};"
        f" median HD95 {np.median(hd) if hd else float('nan'):.1f} mm; prediction {np.mean([r['predict_s'] for r in rows.values()]):.1f} s per scan",
        "",
        "| case | binary Dice | mean per-structure Dice | " + " | ".join(names.get(lab, str(lab)) for lab in labels) + " |",
        "|---|---|---|" + "---|" * len(labels),
    ]
    for case, r in rows.items():
        lines.append(f"| {case} | {r['binary_dice']:.3f} | {r['mean_dice']:.3f} | "
                     + " | ".join(f"{r['per_structure'].get(str(lab), 0.0):.3f}" for lab in labels) + " |")
    lines.append(f"| **mean** | **{binary:.3f}** | **{mean:.3f}** | "
                 + " | ".join(f"{per_label[lab]:.3f}" for lab in labels) + " |")
    report = "\n".join(lines) + "\n"
    print(report)
    print(f"predictions kept in {work}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
    if args.json:
        Path(args.json).write_text(json.dumps({"binary_dice": binary, "mean_dice": mean, "per_structure": per_label,
                                               "rows": rows, "training": {k: v for k, v in training.items() if k != "stdout"},
                                               "iterations": iterations}, indent=2, default=str))


if __name__ == "__main__":
    main()
