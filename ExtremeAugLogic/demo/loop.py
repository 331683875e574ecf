"""The unattended annotate-train-correct loop: ``python -m ExtremeAugLogic demo``.

Scan 1 delineated -> train -> predict scan 2 -> "correct" it with its true label -> add it
-> retrain (warm start) -> predict scan 3. Training runs as a background process started by
the same launcher the Slicer module uses (``ExtremeAugLogic.launcher``), and the demo follows
it through ``status.json``. Each round
prints the Dice of the prediction and how many voxels the correction changed.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path

from ExtremeAugLogic import contract, launcher
from ExtremeAugLogic.demo.phantom import phantom_names, write_phantom_set
from ExtremeAugLogic.devices import is_gpu, resolve_device
from ExtremeAugLogic.errors import InputError
from ExtremeAugLogic.evaluation import changed_voxels, dice_scores
from ExtremeAugLogic.inference import predict_file
from ExtremeAugLogic.workspace import Workspace
from ExtremeAugLogic.workspace.imageio import read_label
from ExtremeAugLogic.workspace.status import format_eta, read_status

DEMO_MINUTES_CPU = 3.0


def find_cases(folder: Path) -> list[tuple[str, Path, Path]]:
    """(id, image, label) for every ``<id>_image.nii.gz`` with a ``<id>_label.nii.gz`` beside it."""
    if not folder.is_dir():
        raise InputError(f"{folder}: data folder not found")
    cases = []
    for image in sorted(folder.glob("*_image.nii.gz")):
        case_id = image.name[: -len("_image.nii.gz")]
        label = folder / f"{case_id}_label.nii.gz"
        if label.is_file():
            cases.append((case_id, image, label))
    if len(cases) < 3:
        raise InputError(f"{folder}: the demo needs 3 cases named <id>_image.nii.gz + <id>_label.nii.gz, found {len(cases)}")
    return cases


def phantom_cases(folder: Path) -> tuple[list, dict]:
    pairs = write_phantom_set(folder, 3, seed0=1)
    return [(f"phantom{i + 1:02d}", img, lab) for i, (img, lab) in enumerate(pairs)], phantom_names("vertebrae")


def run_training(workspace: Path, budget: list[str], extra: list[str], say) -> None:
    """Start training as a background process and follow its status file until it ends."""
    # the training process prints its own closing line (version, validation, best or not)
    args = launcher.engineCommand(sys.executable, "train", workspace, *budget, *extra, "--quiet")
    process = launcher.EngineProcess(args, env=launcher.engineEnvironment(),
                                     logPrefix=workspace / "logs" / "train").start()
    last = ""
    while process.isRunning():
        time.sleep(2.0)
        state = read_status(workspace / contract.STATUS_NAME) or {}
        if state.get("phase") in contract.FINAL_PHASES:
            continue
        line = (f"  {state.get('phase', 'starting')}: iteration {state.get('iteration', 0)}/{state.get('total') or '?'}"
                f", loss {state.get('loss') or 0:.3f}, ETA {format_eta(state.get('eta_s'))}")
        if line != last:
            say(line)
            last = line
    say(process.stdoutTail(1))
    state = read_status(workspace / contract.STATUS_NAME) or {}
    if process.wait() != 0 or state.get("phase") != "done":
        raise RuntimeError(f"training ended with {state.get('phase')}: "
                           f"{state.get('error') or state.get('message') or process.lastError(state)}")


def run_demo(data: str | None = None, workspace: str | None = None, minutes: float | None = None,
             iterations: int | None = None, model: str = "2d", device: str = "auto", say=print) -> dict:
    """Run the loop; returns the per-round figures."""
    root = (Path(workspace) if workspace else Path("demo-workspace") / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
    if data:
        cases, names = find_cases(Path(data))[:3], None
    else:
        say("making 3 phantom scans (procedural lumbar spine, labels L1..L5)")
        cases, names = phantom_cases(root / "inputs")
    ws = Workspace.create(root / "workspace", structure_names=names)
    if iterations:
        budget = ["--iterations", str(iterations)]
    elif minutes or not is_gpu(resolve_device(device)):
        budget = ["--minutes", str(minutes or DEMO_MINUTES_CPU)]
    else:
        budget = []  # the engine's GPU default
    extra = ["--model", model, "--device", device]
    rounds = []

    (id1, img1, lab1), (id2, img2, lab2), (id3, img3, lab3) = cases[:3]
    say(f"round 1: the clinician delineates {id1}")
    ws.add_case(img1, lab1, case_id=id1, structure_names=names)
    run_training(ws.path, budget, extra, say)

    pred2, row = _predict_round(ws, 1, id2, img2, lab2, root, device, say, "the correction changes")
    rounds.append(row)

    say(f"round 2: the corrected {id2} joins the training set; retraining from the last model")
    ws.add_case(img2, lab2, case_id=id2, corrected_from=pred2, predicted_by=ws.best_version())
    run_training(ws.path, budget, extra + ["--init-from", "best"], say)

    _, row = _predict_round(ws, 2, id3, img3, lab3, root, device, say, "a correction would change")
    rounds.append(row)

    say("\nround  case         mean Dice  binary Dice  voxels to correct")
    for r in rounds:
        say(f"{r['round']:>5}  {r['case']:<12} {r['mean_dice']:>9.3f}  {r['binary_dice']:>11.3f}  {r['changed_voxels']:>17}")
    say(f"workspace: {ws.path}")
    return {"workspace": str(ws.path), "rounds": rounds}


def _predict_round(ws, number: int, case_id: str, image, truth_path, root: Path, device: str, say,
                   wording: str) -> tuple[Path, dict]:
    """Predict the round's next scan with the best model and score it against its true label."""
    say(f"round {number}: predicting {case_id}")
    path = root / "predictions" / f"{case_id}_v{number}.nii.gz"
    predict_file(ws, image, path, device=device)
    prediction, truth = read_label(path, allow_empty=True), read_label(truth_path)
    scores = dice_scores(prediction, truth)
    changed = changed_voxels(prediction, truth)
    say(f"  {case_id}: mean Dice {scores['mean_dice']:.3f}, binary Dice {scores['binary_dice']:.3f}; "
        f"{wording} {changed} voxels")
    return path, {"round": number, "case": case_id, "mean_dice": float(scores["mean_dice"]),
                  "binary_dice": float(scores["binary_dice"]), "changed_voxels": changed}
