"""Command line: ``python -m ExtremeAugLogic {init,add,train,predict,evaluate,demo,...}``.

Every bad input ends with one line on stderr naming the file and what is wrong, exit code 2,
no traceback, and the workspace unchanged. Each command imports what it needs when it runs,
so ``--help`` and ``status`` answer without loading torch. Under torchrun (``train`` on several
processes) only rank 0 prints: the other ranks' errors are rank 0's own, already printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ExtremeAugLogic import contract
from ExtremeAugLogic.errors import InputError

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ExtremeAugLogic",
                                     description="Train a segmentation model from one delineated scan.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create a workspace folder")
    p.add_argument("workspace")
    p.add_argument("--modality", default="MRI")
    p.add_argument("--names", help="structure names as JSON, e.g. '{\"1\": \"L1\"}', or a JSON file")

    p = sub.add_parser("add", help="add a delineated or corrected scan to the training set, "
                                   "or a scan without a label to the worklist")
    p.add_argument("workspace")
    p.add_argument("--image", required=True)
    p.add_argument("--label", help="its delineation; without it the scan joins the worklist, and adding its "
                                   "label later (same --case-id) moves it into the training set")
    p.add_argument("--case-id")
    p.add_argument("--corrected-from", help="the unedited prediction this label was corrected from")
    p.add_argument("--predicted-by", metavar="VERSION",
                   help="the model version that made --corrected-from (known by itself for a worklist scan's "
                        "waiting prediction); its test-then-train score is measured on this correction")
    p.add_argument("--split", choices=("auto", "train", "validation"), default="auto")
    p.add_argument("--names", help="structure names as JSON or a JSON file")

    p = sub.add_parser("train", help="train a new model version (runs until its budget is spent)",
                       description="Train a new model version. On several GPUs or CPU processes: "
                                   "torchrun --standalone --nproc-per-node N -m ExtremeAugLogic train WORKSPACE ... "
                                   "(batch_size is per process; the learning rate is unchanged).")
    p.add_argument("workspace")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="wall-clock budget (default 8 on CPU, 1 on GPU; "
                        "a quarter of that with --init-from)")
    budget.add_argument("--iterations", type=int, help="iteration budget")
    p.add_argument("--level", type=int, help="augmentation level N (transforms per patch; 0 = unlimited)")
    p.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--resume", action="store_true", help="continue the last stopped training")
    p.add_argument("--init-from", help="warm start from a version (vN, best or latest)")
    p.add_argument("--model", choices=contract.MODEL_KINDS, default=contract.DEFAULT_MODEL_KIND)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe setting, value as JSON (e.g. --set batch_size=8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-predict-worklist", action="store_true",
                   help="after a new best model, do not predict the worklist scans")
    p.add_argument("--no-unlabeled", action="store_true",
                   help="do not learn from the worklist's scans even when the model's settings ask for it "
                        "(--set unlabeled=self-training or consistency)")

    p = sub.add_parser("predict", help="segment a scan with a model version, or the whole worklist")
    p.add_argument("workspace")
    p.add_argument("--image")
    p.add_argument("--output")
    p.add_argument("--worklist", action="store_true",
                   help="predict every worklist scan whose waiting prediction is missing or stale (best model)")
    p.add_argument("--version", help="vN, best (default) or latest")
    p.add_argument("--device", default="auto")
    p.add_argument("--tta", action="store_true", help="average with flipped predictions")
    p.add_argument("--objects", choices=("off", "per-object", "ordered", "ordered-aligned", "ordered-split"), default=None,
                   help="one structure label per connected object (per-object), also in anatomical order "
                        "(ordered; ordered-aligned: its chain chosen among all large objects; ordered-split: objects as long as several structures cut into as many first), or voxel by voxel (off); default: the model's setting")
    p.add_argument("--min-component-fraction", type=float, default=None,
                   help="drop components smaller than this fraction of a structure's largest (0 = keep all)")

    p = sub.add_parser("evaluate", help="Dice and HD95 of a prediction against a reference label")
    p.add_argument("--prediction", required=True)
    p.add_argument("--reference", required=True)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("status", help="print the workspace's training status, worklist, rounds and model versions")
    p.add_argument("workspace")

    p = sub.add_parser("demo", help="run the whole annotate-train-correct loop unattended")
    p.add_argument("--data", help="a folder of <id>_image.nii.gz/<id>_label.nii.gz (default: the phantom)")
    p.add_argument("--workspace", default=None, help="where to work (default: a new folder under ./demo-workspace)")
    p.add_argument("--minutes", type=float, default=None, help="budget per training round")
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--model", choices=contract.MODEL_KINDS, default=contract.DEFAULT_MODEL_KIND)
    p.add_argument("--device", default="auto")

    p = sub.add_parser("experiment", help="the paper's grid: one model per (training scans, augmentation level)",
                       description="Train one model per (number of training scans s, augmentation level N) plus "
                                   "baselines, each with the same budget; validation Dice tables, figures and a "
                                   "report in --out. Rerun the same command to continue a stopped grid.")
    p.add_argument("--data", required=True, help="a folder of <id>_image.nii.gz/<id>_label.nii.gz")
    p.add_argument("--train", nargs="+", required=True, metavar="ID",
                   help="training pool in order (ranges such as vb01..vb10 allowed); a cell uses the first s")
    p.add_argument("--validate", nargs="+", required=True, metavar="ID", help="validation cases (ranges allowed)")
    p.add_argument("--subjects", nargs="+", type=int, default=None, metavar="S",
                   help="training-set sizes (default: 1 3 5 7 9, those the --train list allows)")
    p.add_argument("--levels", nargs="*", type=int, default=[5, 10, 20, 30, 40, 50], metavar="N",
                   help="augmentation levels (default: the paper's 5 10 20 30 40 50)")
    p.add_argument("--out", required=True, help="results folder (results.json, report.md, figures, cells/)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes-per-cell", type=float, help="equal wall-clock budget per cell (default: the "
                        "engine's, 8 on CPU, 1 on GPU)")
    budget.add_argument("--iterations-per-cell", type=int, help="equal iteration budget per cell")
    p.add_argument("--baselines", nargs="*", choices=("none", "crops"), default=["none", "crops"],
                   help="baselines per training-set size (default both; give none of them for no baseline)")
    p.add_argument("--compute", choices=("equal", "epochs"), default="equal",
                   help="equal: the same budget for every cell (default); epochs: the paper's rule, budget x N/min(N)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe setting for every cell, value as JSON (e.g. --set batch_size=8)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-dice-cases", type=int, default=None, metavar="K",
                   help="score at most K of a cell's training scans for Table I (default all; 0 = none)")
    p.add_argument("--in-process", action="store_true",
                   help="train in this process instead of a child process (no peak-memory figure)")
    return parser


def parse_names(text: str | None) -> dict | None:
    """Structure names from inline JSON or a JSON file."""
    if not text:
        return None
    source = Path(text)
    try:
        raw = source.read_text(encoding="utf-8") if source.is_file() else text
        names = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise InputError(f"--names {text}: not valid JSON ({exc})") from None
    if not isinstance(names, dict):
        raise InputError(f"--names {text}: must be a JSON object such as {{\"1\": \"L1\"}}")
    return names


def parse_settings(pairs: list[str]) -> dict:
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--set {pair}: expected KEY=VALUE")
        try:
            settings[key] = json.loads(value)
        except ValueError:
            settings[key] = value
    return settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0
    except InputError as exc:
        if _rank0():
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _rank0() -> bool:
    """Whether this process prints: always, except the ranks other than 0 of a torchrun training."""
    return "WORLD_SIZE" not in os.environ or os.environ.get("RANK", "0") == "0"


def cmd_init(args) -> int:
    from ExtremeAugLogic.workspace import Workspace

    ws = Workspace.create(args.workspace, modality=args.modality, structure_names=parse_names(args.names))
    print(f"workspace ready: {ws.path}")


def cmd_add(args) -> int:
    from ExtremeAugLogic.workspace import Workspace

    ws = Workspace.open(args.workspace)
    if args.label is None:
        if args.corrected_from:
            raise InputError("--corrected-from: give the corrected label with --label too")
        if args.split != "auto":
            raise InputError(f"--split {args.split}: a scan without a label goes to the worklist; add --label")
        case = ws.add_to_worklist(args.image, case_id=args.case_id)
        print(f"added {case['id']} to the worklist ({len(ws.worklist_cases())} scan(s) without a label)")
        return
    case = ws.add_case(args.image, args.label, case_id=args.case_id, corrected_from=args.corrected_from,
                       structure_names=parse_names(args.names), split=args.split, predicted_by=args.predicted_by)
    extra = ""
    if case.get("changed_voxels") is not None:
        extra = (f"; the correction changed {case['changed_voxels']} voxels in {case.get('slices_touched')} slice(s), "
                 f"structures {case.get('structures_changed') or 'none'}")
    print(f"added {case['id']} ({case['status']}, {case['split']}){extra}")
    if case.get("test_scores"):
        tested = case["test_scores"]
        print(f"test-then-train: the prediction{' by ' + case['predicted_by'] if case.get('predicted_by') else ''} "
              f"scored Dice {tested['mean_dice']:.3f} (binary {tested['binary_dice']:.3f}) against this correction")
    if case.get("trial"):
        print(case["trial"])
        if any(row["state"] == "stale" for row in ws.worklist_state()):
            print(f"the waiting predictions are stale now; 'predict {args.workspace} --worklist' redoes them")
    if not ws.validation_cases():
        print(ws.validation_note())
    print(f"queued: {len(ws.queued())} (training cases not in the best model yet; the next training takes them)")
    _redraw_rounds_chart(ws)


def _redraw_rounds_chart(ws) -> None:
    """Rewrite rounds.png after an accepted correction or a training; a failure to draw is only reported."""
    try:
        ws.write_rounds_chart()
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"warning: {ws.rounds_chart_path} not redrawn ({type(exc).__name__}: {exc})", file=sys.stderr)


def cmd_train(args) -> int:
    from ExtremeAugLogic.workspace import Workspace

    Workspace.open(args.workspace)  # a bad workspace is refused before torch is imported (seconds)
    from ExtremeAugLogic.training import TrainRequest, train

    request = TrainRequest(args.workspace, minutes=args.minutes, iterations=args.iterations, level=args.level,
                           device=args.device, resume=args.resume, init_from=args.init_from, model=args.model,
                           settings=parse_settings(args.set), seed=args.seed, progress_bar=not args.quiet,
                           unlabeled=not args.no_unlabeled)
    try:
        result = train(request)
    except InputError:
        raise
    except Exception as exc:
        if _rank0():
            print(f"error: training failed: {type(exc).__name__}: {exc} (details in status.json)", file=sys.stderr)
        return EXIT_FAILED
    if not _rank0():
        return 0
    print(result["message"])
    ws = Workspace.open(args.workspace)
    _redraw_rounds_chart(ws)
    if result.get("is_best") and not args.no_predict_worklist:
        from ExtremeAugLogic.inference.worklist import predict_worklist

        done = predict_worklist(ws, args.device)
        if done:
            print(f"predicted {len(done)} worklist scan(s) with the new best model")


def cmd_predict(args) -> int:
    from ExtremeAugLogic.workspace import Workspace

    workspace = Workspace.open(args.workspace)  # a bad workspace is refused before torch is imported
    from ExtremeAugLogic.inference import DEFAULT_MIN_COMPONENT_FRACTION, predict_file

    if args.worklist:
        if args.image or args.output:
            raise InputError("--worklist: predicts the workspace's own worklist scans; leave out --image and --output")
        from ExtremeAugLogic.inference.worklist import predict_worklist

        done = predict_worklist(workspace, args.device, log=print)
        print(f"worklist: {len(done)} prediction(s) made, "
              f"{len(workspace.worklist_cases()) - len(done)} already up to date")
        return
    if not (args.image and args.output):
        raise InputError("predict: give --image and --output (or --worklist)")
    fraction = DEFAULT_MIN_COMPONENT_FRACTION if args.min_component_fraction is None else args.min_component_fraction
    result = predict_file(workspace, args.image, args.output, version=args.version,
                          device=args.device, tta=args.tta, min_component_fraction=fraction, objects=args.objects)
    print(f"wrote {result['output']} with model {result['version']}: "
          f"{', '.join(result['structures_found']) or 'nothing found'}")


def cmd_evaluate(args) -> int:
    from ExtremeAugLogic.evaluation import evaluate_files, format_report

    result = evaluate_files(args.prediction, args.reference)
    print(json.dumps(result, indent=2, default=str) if args.json else format_report(result))


def cmd_status(args) -> int:
    from ExtremeAugLogic.workspace.status import format_eta, read_status
    from ExtremeAugLogic.workspace import Workspace

    ws = Workspace.open(args.workspace)
    state = read_status(ws.status_path)
    if state:
        world = state.get("world_size") if isinstance(state.get("world_size"), int) else 1
        print(f"training: {state.get('phase')} {state.get('version') or ''} it {state.get('iteration')}/"
              f"{state.get('total')} loss {state.get('loss')} val Dice {state.get('val_dice')} "
              f"ETA {format_eta(state.get('eta_s'))}{f' on {world} processes' if world > 1 else ''} "
              f"{state.get('error') or ''}")
    worklist = [c["id"] for c in ws.worklist_cases()]
    print(f"cases: {len(ws.training_cases())} training, {len(ws.validation_cases())} validation, "
          f"{len(worklist)} in the worklist{' (' + ', '.join(worklist) + ')' if worklist else ''}")
    queued = ws.queued()
    print(f"queued: {len(queued)}{' (' + ', '.join(queued) + ')' if queued else ''}"
          " - training cases not in the best model yet; the next training takes them")
    rows = ws.worklist_state(contract.SUGGESTED_ORDER)
    if rows:
        print("worklist, in the order the scans were added (the next scan: the first with a ready prediction):")
    for row in rows:
        print(f"  worklist {row['id']}: prediction {row['state']}"
              + (f" by {row['version']}, uncertainty {row['uncertainty']:.3f}" if row["version"] else ""))
    rounds = ws.rounds()
    if rounds:
        print(format_rounds(rounds))
    if ws.rounds_chart_path.is_file():
        print(f"chart of the rounds: {ws.rounds_chart_path}")
    best = ws.best_version()
    tested = ws.test_then_train_scores()
    print("model versions (val Dice: on the validation cases; test-then-train: on the corrected scans it predicted):")
    for v in ws.versions():
        dice = (v.get("val_scores") or {}).get("mean_dice")
        score = tested.get(v["name"])
        note = ""
        if v["name"] == best:
            note = f"  (best, on trial against {v['trial_against']})" if v.get("trial_against") else "  (best)"
        print(f"  {v['name']}: {v['status']}, val Dice {'-' if dice is None else f'{dice:.3f}'}"
              + (f", test-then-train Dice {score['mean_dice']:.3f} over {score['scans']} scan(s)" if score else "")
              + note)


def format_rounds(rows: list) -> str:
    """The rounds table of ``status``: one line per accepted correction."""
    def number(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    table = [("round", "case", "predicted by", "Dice", "binary", "voxels", "slices", "structures", "trained by")]
    for r in rows:
        trained = r["trained_by"] or "queued"
        table.append((str(r["round"]), r["id"], r["predicted_by"] or "?", number(r["mean_dice"]),
                      number(r["binary_dice"]), "-" if r["changed_voxels"] is None else str(r["changed_voxels"]),
                      "-" if r["slices_touched"] is None else str(r["slices_touched"]),
                      ",".join(map(str, r["structures_changed"])) or "-",
                      trained + (" (in best)" if r["in_best"] else "")))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["rounds (each accepted correction; Dice of the prediction it came from, measured before training on it):"]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines)


def cmd_demo(args) -> int:
    from ExtremeAugLogic.demo.loop import run_demo

    run_demo(data=args.data, workspace=args.workspace, minutes=args.minutes, iterations=args.iterations,
             model=args.model, device=args.device)


def cmd_experiment(args) -> int:
    import shlex

    from ExtremeAugLogic.experiments.grid import ExperimentSpec, run_experiment

    argv = sys.argv[1:] if sys.argv[1:2] == ["experiment"] else None
    command = "python -m ExtremeAugLogic " + (shlex.join(argv) if argv else "experiment ...")
    spec = ExperimentSpec(data=args.data, train=args.train, validate=args.validate, out=args.out,
                          subjects=args.subjects or [], levels=args.levels, baselines=args.baselines,
                          minutes_per_cell=args.minutes_per_cell, iterations_per_cell=args.iterations_per_cell,
                          compute=args.compute, settings=parse_settings(args.set), device=args.device,
                          seed=args.seed, in_process=args.in_process, train_dice_cases=args.train_dice_cases,
                          command=command)
    try:
        run_experiment(spec, log=lambda line: print(line, flush=True))
    except InputError:
        raise
    except KeyboardInterrupt:
        print(f"stopped; run the same command again to continue from {args.out}", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"error: experiment failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED


COMMANDS = {"init": cmd_init, "add": cmd_add, "train": cmd_train, "predict": cmd_predict,
            "evaluate": cmd_evaluate, "status": cmd_status, "demo": cmd_demo, "experiment": cmd_experiment}
