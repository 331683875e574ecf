"""The loop as a clinician lives it, on real scans: correct, retrain, correct again.

    python benchmarks/loop.py --set vb --start vb01 --rounds 4
    python benchmarks/loop.py --set vb --start vb01 --rounds 1 --minutes 0.3 --retrain-minutes 0.2 --worklist vb02 vb03
    python benchmarks/loop.py --set vb --start vb01 --rounds 2 --iterations 2040 --retrain-iterations 510

Budgets are wall-clock minutes (as a clinician's workstation runs them) or, with ``--iterations`` /
``--retrain-iterations``, iterations: the same training on any machine, for a shared or slow machine
whose minutes buy fewer iterations than usual.

From one delineated scan, with every other scan of the set in the worklist:

0. ``train`` (first budget) once; the engine then predicts every worklist scan (``predict --worklist``);
   every configuration continues from a copy of this workspace (worklist order: ``added`` or
   ``uncertainty``, the suggested order; retraining: ``warm`` = from the best model for the retrain
   budget, or ``scratch`` = a fresh model for the first training's budget);
1. per round of a configuration: take the next scan in its order, "correct" its waiting
   prediction with the true label (``add --label --case-id``: the engine records voxels changed,
   slices touched and structures changed against that prediction, and scores the prediction
   against the correction), retrain; the engine predicts the worklist again with the new model;
2. score: the waiting predictions of every scan not corrected yet against their true labels
   (binary and per-structure Dice), i.e. the model of this round on unseen scans.

Corrected scans join training (``--split train``): each is scored before it is trained on, so
its correction effort is an unseen-scan measurement (test-then-train); no scan is held out.
Everything goes through the engine's command line, in child processes, one at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import engine, machine, require_data, run_measured_child

SETS = {"vb": ("spine-vb", {i: f"L{i}" for i in range(1, 6)}),
        "ivd": ("spine-ivd", {1: "L5-S1", 2: "L4-L5", 3: "L3-L4", 4: "L2-L3", 5: "L1-L2"})}


def remaining_scores(ws_path: Path, data: Path, labels: list[int]) -> dict:
    """Dice of every waiting worklist prediction against its scan's true label."""
    import SimpleITK as sitk

    from ExtremeAugLogic.evaluation import dice_scores
    from ExtremeAugLogic.workspace import Workspace
    from ExtremeAugLogic.workspace.imageio import read_label

    ws = Workspace.open(ws_path)
    scores = {}
    for row in ws.worklist_state():
        if row["state"] != "ready":
            raise RuntimeError(f"{row['id']}: no up-to-date prediction after training ({row['state']})")
        truth = read_label(data / f"{row['id']}_label.nii.gz")
        prediction = read_label(row["prediction"], allow_empty=True)
        dice = dice_scores(sitk.GetArrayViewFromImage(prediction), sitk.GetArrayViewFromImage(truth), labels)
        scores[row["id"]] = {"binary_dice": dice["binary_dice"], "mean_dice": dice["mean_dice"],
                             "uncertainty": row["uncertainty"]}
    return scores


def summary(scores: dict) -> dict:
    if not scores:
        return {"binary_dice": None, "mean_dice": None, "scans": 0}
    return {"binary_dice": float(np.mean([s["binary_dice"] for s in scores.values()])),
            "mean_dice": float(np.mean([s["mean_dice"] for s in scores.values()])), "scans": len(scores)}


def train_start(args, data: Path, work: Path, names: dict) -> tuple[Path, dict]:
    """The delineated scan, the worklist and the first training, once for every configuration:
    each configuration continues from a copy, so all start from the same model (round 0)."""
    ws = work / "start" / "ws"
    log = ws.parent / "engine.log"
    ws.parent.mkdir(parents=True)
    run_measured_child(engine("init", ws, "--names", json.dumps({str(k): v for k, v in names.items()})), log)
    run_measured_child(engine("add", ws, "--image", data / f"{args.start}_image.nii.gz", "--label",
                              data / f"{args.start}_label.nii.gz", "--case-id", args.start, "--split", "train"), log)
    for case in args.worklist:
        run_measured_child(engine("add", ws, "--image", data / f"{case}_image.nii.gz", "--case-id", case), log)
    first = run_measured_child(engine("train", ws, *budget(args.minutes, args.iterations), "--quiet",
                                      *args.train_options), log)
    round0 = {"round": 0, "corrected": None, "train_wall_s": round(first["wall_s"], 1),
              "scores": remaining_scores(ws, data, sorted(names))}
    round0.update(summary(round0["scores"]))
    print(f"  round 0: binary {round0['binary_dice']:.3f}, per-structure {round0['mean_dice']:.3f} "
          f"on {round0['scans']} scans; first training + worklist {round0['train_wall_s']:.0f} s", flush=True)
    return ws, round0


def run_loop(args, data: Path, work: Path, start_ws: Path, round0: dict, order: str, warm: bool,
             names: dict, run: dict, save) -> None:
    """Fill ``run['rounds']`` round by round, calling ``save()`` after each (a run cut short keeps its rounds)."""
    ws = work / f"{order}-{'warm' if warm else 'scratch'}" / "ws"
    log = ws.parent / "engine.log"
    ws.parent.mkdir(parents=True)
    shutil.copytree(start_ws, ws)
    labels = sorted(names)
    rounds = run["rounds"]
    rounds.append(dict(round0))
    save()
    from ExtremeAugLogic.workspace import Workspace

    for number in range(1, args.rounds + 1):
        state = Workspace.open(ws).worklist_state(order)
        if not state:
            break
        case = state[0]["id"]
        best_before = Workspace.open(ws).best_version()
        run_measured_child(engine("add", ws, "--image", data / f"{case}_image.nii.gz", "--label",
                                  data / f"{case}_label.nii.gz", "--case-id", case, "--split", "train"), log)
        after_add = Workspace.open(ws)
        entry, best_after_add = after_add.case(case), after_add.best_version()
        retrain = ["--init-from", "best", *budget(args.retrain_minutes, args.retrain_iterations)] if warm else \
            [*args.train_options, *budget(args.scratch_minutes, args.iterations)]
        timing = run_measured_child(engine("train", ws, "--quiet", *retrain), log)
        tested = entry.get("test_scores") or {}
        row = {"round": number, "corrected": case, "changed_voxels": entry.get("changed_voxels"),
               "slices_touched": entry.get("slices_touched"), "structures_changed": entry.get("structures_changed"),
               "predicted_by": entry.get("predicted_by"), "tested_binary": tested.get("binary_dice"),
               "tested_mean": tested.get("mean_dice"), "best_before": best_before,
               "best_after_correction": best_after_add, "best_after_retrain": Workspace.open(ws).best_version(),
               "train_wall_s": round(timing["wall_s"], 1), "scores": remaining_scores(ws, data, labels)}
        row.update(summary(row["scores"]))
        rounds.append(row)
        save()
        print(f"  round {number}: corrected {case} ({row['changed_voxels']} voxels, {row['slices_touched']} slices); "
              f"binary {_f(row['binary_dice'])}, per-structure {_f(row['mean_dice'])} on {row['scans']} scans; "
              f"retrain + worklist {row['train_wall_s']:.0f} s", flush=True)


def budget(minutes: float, iterations: int | None) -> list:
    """The train command's budget option: iterations when given, else wall-clock minutes."""
    return ["--iterations", iterations] if iterations else ["--minutes", minutes]


def budget_text(minutes: float, iterations: int | None) -> str:
    return f"{iterations} iterations" if iterations else f"{minutes:g} min"


def _f(value):
    return "-" if value is None else f"{value:.3f}"


def render(results: dict, command: str) -> str:
    lines = [f"# The loop on real scans: {results['set']}, start {results['start']}", "",
             f"- command: `{command}`", f"- machine: {results['machine']}",
             f"- first training {budget_text(results['minutes'], results.get('iterations'))}; each retrain: warm start "
             f"(from the best model) {budget_text(results['retrain_minutes'], results.get('retrain_iterations'))}, "
             f"from scratch {budget_text(results.get('scratch_minutes', results['minutes']), results.get('iterations'))} "
             "(train + worklist s includes predicting the worklist with the new model); every configuration "
             "continues from the same first model",
             "- effort: what the correction of that round's scan changed in its waiting prediction; tested: the "
             "Dice of that prediction against the correction (test-then-train, an unseen-scan score of the model "
             "that made it); best: the best version after the correction was accepted (a model on trial kept or "
             "reverted) and after the retrain; Dice: the waiting predictions of the scans not corrected yet", ""]
    for run in results["runs"]:
        lines += [f"## order {run['order']}, {'warm start' if run['warm'] else 'from scratch'}", "",
                  "| round | corrected | voxels changed | slices touched | structures changed | tested binary / "
                  "per-structure | best after correction -> retrain | binary Dice | per-structure Dice | scans | "
                  "train + worklist s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in run["rounds"]:
            tested = "-" if r.get("tested_binary") is None else f"{r['tested_binary']:.3f} / {r['tested_mean']:.3f}"
            best = "-" if not r["round"] else f"{r.get('best_after_correction')} -> {r.get('best_after_retrain')}"
            lines.append(f"| {r['round']} | {r['corrected'] or '-'} | {r.get('changed_voxels', '-')} | "
                         f"{r.get('slices_touched', '-')} | {r.get('structures_changed', '-')} | {tested} | {best} | "
                         f"{_f(r['binary_dice'])} | {_f(r['mean_dice'])} | {r['scans']} | {r['train_wall_s']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for run in results["runs"]:
        name = f"{run['order']}, {'warm' if run['warm'] else 'scratch'}"
        xs = [r["round"] for r in run["rounds"]]
        left.plot(xs, [r["mean_dice"] for r in run["rounds"]], marker="o", label=name)
        right.plot(xs[1:], [r["changed_voxels"] for r in run["rounds"][1:]], marker="o", label=name)
    rounds = sorted({r["round"] for run in results["runs"] for r in run["rounds"]})
    left.set(xlabel="round", ylabel="per-structure Dice, scans not corrected yet", ylim=(0, 1), xticks=rounds)
    right.set(xlabel="round (the scan corrected in it)", ylabel="voxels the correction changed", xticks=rounds[1:])
    left.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


@contextlib.contextmanager
def work_folder(keep: Path | None):
    """``keep`` (created when new) or a temporary folder removed afterwards."""
    if keep is None:
        with tempfile.TemporaryDirectory(prefix="extremeaug-loop-") as tmp:
            yield tmp
    else:
        keep.mkdir(parents=True, exist_ok=True)
        yield str(keep)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=sorted(SETS), default="vb")
    parser.add_argument("--start", default=None, help="the delineated scan (default: the set's first)")
    parser.add_argument("--worklist", nargs="*", default=None, help="the scans to correct (default: all others)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--minutes", type=float, default=8.0, help="first training")
    parser.add_argument("--retrain-minutes", type=float, default=2.0)
    parser.add_argument("--scratch-minutes", type=float, default=None,
                        help="a retrain from scratch (default: the first training's budget)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="first training (and a retrain from scratch) in iterations instead of minutes")
    parser.add_argument("--retrain-iterations", type=int, default=None,
                        help="a warm-start retrain in iterations instead of minutes")
    parser.add_argument("--runs", nargs="+", default=["added/warm", "uncertainty/warm", "added/scratch"],
                        choices=[f"{o}/{s}" for o in ("added", "uncertainty") for s in ("warm", "scratch")],
                        help="worklist order / retraining: added = the order the scans were added, uncertainty = "
                             "the suggested order; warm = from the best model, scratch = a fresh model")
    parser.add_argument("--set-option", action="append", default=[], help="recipe setting KEY=VALUE for train")
    parser.add_argument("--out", default=None, help="markdown report (default docs/results/loop-<set>.md)")
    parser.add_argument("--keep", type=Path, default=None, metavar="FOLDER",
                        help="keep the workspaces (the first training's and each run's) in FOLDER, new or empty, "
                             "to look at their models and predictions afterwards (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.keep is not None and args.keep.exists() and (not args.keep.is_dir() or any(args.keep.iterdir())):
        parser.error(f"--keep {args.keep}: must be a new or empty folder")
    folder, names = SETS[args.set]
    data = require_data(folder)
    cases = sorted(p.name[: -len("_image.nii.gz")] for p in data.glob("*_image.nii.gz"))
    args.start = args.start or cases[0]
    args.worklist = args.worklist if args.worklist is not None else [c for c in cases if c != args.start]
    out = Path(args.out or Path(__file__).resolve().parent.parent / "docs" / "results" / f"loop-{args.set}.md")
    command = "python benchmarks/loop.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    args.scratch_minutes = args.scratch_minutes or args.minutes
    args.train_options = [x for kv in args.set_option for x in ("--set", kv)]  # a fresh model's settings
    results = {"set": args.set, "start": args.start, "minutes": args.minutes, "retrain_minutes": args.retrain_minutes,
               "scratch_minutes": args.scratch_minutes, "iterations": args.iterations,
               "retrain_iterations": args.retrain_iterations,
               "machine": machine(), "runs": []}
    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(results, indent=1))
        plot(results, out.with_suffix(".png"))
        out.write_text(render(results, command) + f"\n![Dice and correction effort per round]({out.stem}.png)\n")

    with work_folder(args.keep) as tmp:
        print(f"loop: first training from {args.start} ({budget_text(args.minutes, args.iterations)}), "
              f"{len(args.worklist)} scans in the worklist",
              flush=True)
        start_ws, round0 = train_start(args, data, Path(tmp), names)
        for run in args.runs:
            order, start = run.split("/")
            print(f"loop: order {order}, {start}", flush=True)
            began = time.monotonic()
            run = {"order": order, "warm": start == "warm", "rounds": []}
            results["runs"].append(run)
            run_loop(args, data, Path(tmp), start_ws, round0, order, start == "warm", names, run, save)
            print(f"  {time.monotonic() - began:.0f} s", flush=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
