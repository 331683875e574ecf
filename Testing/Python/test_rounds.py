"""The loop round by round: test-then-train scores, keep-if-better without validation, the rounds
table and chart, queued corrections, and waiting predictions that survive a kill.

Trainings are tiny (a few iterations of a 4-filter network on 40 x 40 x 16 phantoms): the point
is the bookkeeping, not the Dice. Commands run in this process unless the test needs a process
of its own (a training that runs while corrections arrive, a prediction that is killed).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

from ExtremeAugLogic import cli, contract
from ExtremeAugLogic.demo import phantom
from ExtremeAugLogic.workspace import Workspace
from ExtremeAugLogic.workspace.imageio import read_label, write_image

SMALL = {"inplane_size": 40, "patch_size": 40, "stride": 20, "base_features": 4, "depth": 3, "max_features": 16,
         "batch_size": 2}
SETS = [a for k, v in SMALL.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def engine(*args, timeout=180):
    """The command line in a child process (training and prediction)."""
    return subprocess.run([sys.executable, "-m", "ExtremeAugLogic", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def command(capsys):
    """The command line in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    def run(*args):
        capsys.readouterr()
        code = cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workspace with one delineated phantom, four worklist scans and v1 (their predictions ready)."""
    root = tmp_path_factory.mktemp("loop")
    pairs = phantom.write_phantom_set(root / "data", 5, seed0=71, shape=(40, 40, 16), spacing=(4.0, 4.0, 4.0))
    ws = Workspace.create(root / "ws", structure_names=phantom.phantom_names("vertebrae"))
    ws.add_case(*pairs[0], case_id="first", split="train")
    for i, (image, _) in enumerate(pairs[1:], start=1):
        ws.add_to_worklist(image, case_id=f"w{i}")
    assert cli.main(["train", str(ws.path), "--iterations", "2", "--quiet", *SETS]) == 0
    assert {r["state"] for r in ws.worklist_state()} == {"ready"}
    return ws.path, {f"w{i}": pair for i, pair in enumerate(pairs[1:], start=1)}


@pytest.fixture
def loop_ws(trained, tmp_path):
    """A fresh copy of the trained workspace (each test changes its own)."""
    path, pairs = trained
    shutil.copytree(path, tmp_path / "ws")
    return Workspace.open(tmp_path / "ws"), pairs


def _case_with_prediction(tmp_path, make_case, seed, removed):
    """(scan, true label, prediction) files: the prediction misses ``removed`` columns of label 1."""
    scan, label = make_case(seed=seed)
    truth = sitk.GetArrayFromImage(label)
    predicted = truth.copy()
    predicted[1:3, 3:5, 2:2 + removed] = 0
    prediction = sitk.GetImageFromArray(predicted)
    prediction.CopyInformation(label)
    files = [tmp_path / f"{name}{seed}.nii.gz" for name in ("scan", "label", "prediction")]
    for image, path in zip((scan, label, prediction), files):
        write_image(image, path)
    return files, predicted, truth


# ---------------------------------------------------------------- scores and rules, no training

def test_a_correction_scores_the_prediction_it_came_from(tmp_path, make_case, command):
    """Test-then-train: the Dice of the prediction against the accepted correction, stored with the case."""
    from ExtremeAugLogic.evaluation import dice_scores

    ws = Workspace.create(tmp_path / "ws")
    scan, label = make_case(seed=0)
    ws.add_case(scan, label, case_id="first")
    ws.finish_version(ws.new_version({}, ["first"]), None)
    (scan2, label2, prediction2), predicted, truth = _case_with_prediction(tmp_path, make_case, 1, removed=2)
    code, out, err = command("add", ws.path, "--image", scan2, "--label", label2, "--case-id", "second",
                             "--corrected-from", prediction2, "--predicted-by", "v1")
    assert code == 0, err
    expected = dice_scores(predicted, truth, [1, 2])
    case = ws.case("second")
    assert case["predicted_by"] == "v1" and case["status"] == "corrected"
    assert case["test_scores"] == {"mean_dice": expected["mean_dice"], "binary_dice": expected["binary_dice"],
                                   "per_structure": {"1": expected["per_structure"][1], "2": 1.0}}
    assert case["test_scores"]["mean_dice"] < 1.0 and case["changed_voxels"] == int((predicted != truth).sum())
    assert f"scored Dice {expected['mean_dice']:.3f}" in out and "queued: 1" in out
    # a model version that is not there, or one without its prediction, is refused and changes nothing
    before = snapshot(ws.path)
    for extra, message in ((["--corrected-from", prediction2, "--predicted-by", "v9"], "v9: no such model version"),
                           (["--predicted-by", "v1"], "give the prediction")):
        code, _, err = command("add", ws.path, "--image", scan2, "--label", label2, "--case-id", "third", *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(ws.path) == before


def test_rounds_rows_and_the_queue(tmp_path, make_case):
    """A round per accepted correction, in order; trained_by / in_best follow the versions; the
    Slicer side reads the same rows and the same queue from the manifest."""
    from ExtremeAugLib import workspace_view

    ws = Workspace.create(tmp_path / "ws")
    scan, label = make_case(seed=0)
    ws.add_case(scan, label, case_id="first")
    ws.finish_version(ws.new_version({}, ["first"]), None)
    for seed, case_id in ((1, "c1"), (2, "c2")):
        (s, l, p), _, _ = _case_with_prediction(tmp_path, make_case, seed, removed=seed)
        ws.add_case(s, l, case_id=case_id, corrected_from=p, predicted_by="v1", split="train")
    assert ws.queued() == ["c1", "c2"]
    rows = ws.rounds()
    assert [(r["round"], r["id"], r["predicted_by"], r["trained_by"], r["in_best"]) for r in rows] == \
        [(1, "c1", "v1", None, False), (2, "c2", "v1", None, False)]
    assert rows[0]["mean_dice"] > rows[1]["mean_dice"] and rows[0]["slices_touched"] == 2
    ws.finish_version(ws.new_version({}, ["first", "c1"]), None)  # c2 arrived after this training started
    assert ws.queued() == ["c2"]
    assert [(r["trained_by"], r["in_best"]) for r in ws.rounds()] == [("v2", True), (None, False)]
    assert workspace_view.roundRows(ws.path) == ws.rounds() and workspace_view.queuedCases(ws.path) == ["c2"]
    tested = ws.test_then_train_scores()["v1"]
    assert tested["scans"] == 2 and tested["cases"] == ["c1", "c2"]
    assert tested["mean_dice"] == pytest.approx(np.mean([r["mean_dice"] for r in rows]))


def test_keep_if_better_from_test_then_train_without_validation(tmp_path, make_case):
    """No validation case: a new version is best on trial; the first scan it predicted that is
    corrected decides against the version it replaced. With a validation case, nothing changes."""
    from ExtremeAugLib import workspace_view

    ws = Workspace.create(tmp_path / "ws")
    scan, label = make_case(seed=0)
    ws.add_case(scan, label, case_id="first")

    def correct(case_id, seed, removed, version):
        (s, l, p), _, _ = _case_with_prediction(tmp_path, make_case, seed, removed)
        return ws.add_case(s, l, case_id=case_id, corrected_from=p, predicted_by=version, split="train")

    def finish():
        name = ws.new_version({}, ws.case_ids("train"))
        return name, ws.finish_version(name, None)

    assert finish() == ("v1", True) and ws.version("v1").get("trial_against") is None
    assert "trial" not in correct("c1", 1, 1, "v1")           # v1 had no rival: nothing to decide
    assert finish() == ("v2", True)
    assert ws.version("v2")["trial_against"] == "v1" and "on trial against v1" in ws.version("v2")["best_reason"]
    assert workspace_view.versionRows(ws.path)[1]["trialAgainst"] == "v1"
    decided = correct("c2", 2, 4, "v2")                          # v2's prediction is worse than v1's was
    assert decided["trial"].startswith("v1 is the best model again")
    assert ws.best_version() == "v1" and ws.version("v2")["comparison"].startswith("dropped after its trial")
    assert ws.version("v2")["trial_against"] is None
    on_disk = json.loads((ws.model_dir("v2") / "version.json").read_text())
    assert on_disk["trial_against"] is None and on_disk["comparison"] == ws.version("v2")["comparison"]

    assert finish() == ("v3", True) and ws.version("v3")["trial_against"] == "v1"
    assert correct("c3", 3, 0, "v3")["trial"].startswith("v3 stays the best model")  # a perfect prediction
    assert ws.best_version() == "v3" and ws.version("v3")["trial_against"] is None
    assert finish() == ("v4", True) and finish() == ("v5", True)  # two trainings, no correction between
    assert ws.version("v5")["trial_against"] == "v3" and ws.version("v4")["trial_against"] is None
    rows = {r["name"]: r for r in workspace_view.versionRows(ws.path)}
    assert rows["v1"]["scoreSource"] == "test-then-train" and rows["v1"]["testScans"] == 1
    assert rows["v4"]["score"] is None and rows["v5"]["isBest"]

    # once a validation case exists the validation split decides, as before
    (s, l, p), _, _ = _case_with_prediction(tmp_path, make_case, 4, removed=5)
    assert "trial" not in ws.add_case(s, l, case_id="val", corrected_from=p, predicted_by="v5", split="validation")
    assert ws.best_version() == "v5"
    v6 = ws.new_version({}, ws.case_ids("train"))
    assert ws.finish_version(v6, {"mean_dice": 0.5}) is True and ws.version(v6)["trial_against"] is None


# ---------------------------------------------------------------- through the command line, with training

def test_rounds_table_chart_and_order_through_the_command_line(loop_ws, command):
    """add writes rounds.png and the queue; train redraws it; status lists the rounds and the
    worklist in the order the console's nextScan follows."""
    from ExtremeAugLib.loop_logic import LoopLogic

    ws, pairs = loop_ws
    suggested = [r["id"] for r in ws.worklist_state(contract.SUGGESTED_ORDER)]
    assert suggested == [c["id"] for c in ws.worklist_cases()]  # the order they were added
    logic = LoopLogic(pythonExecutable=sys.executable)
    logic.setWorkspace(ws.path)
    assert logic.nextScan()["id"] == suggested[0] and logic.worklist() == suggested
    shown = command("status", ws.path)[1]
    assert [line.split()[1].rstrip(":") for line in shown.splitlines() if line.startswith("  worklist ")] == suggested

    first = suggested[0]
    code, out, err = command("add", ws.path, "--image", pairs[first][0], "--label", pairs[first][1], "--case-id", first)
    assert code == 0 and "test-then-train: the prediction by v1" in out, err
    chart = ws.rounds_chart_path
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drawn = chart.read_bytes()
    shown = command("status", ws.path)[1]
    assert f"queued: 1 ({first})" in shown and "rounds (each accepted correction" in shown
    row = next(line for line in shown.splitlines() if line.startswith(f"  1      {first}"))
    assert row.split()[2] == "v1" and row.split()[-1] == "queued"
    assert [line.split()[1].rstrip(":") for line in shown.splitlines() if line.startswith("  worklist ")] == suggested[1:]

    code, out, err = command("train", ws.path, "--iterations", 2, "--quiet", "--init-from", "best", *SETS)
    assert code == 0 and "predicted 3 worklist scan(s)" in out, err
    assert chart.read_bytes() != drawn                               # redrawn: the round is in the best model now
    shown = command("status", ws.path)[1]
    assert "queued: 0" in shown and "v2 (in best)" in shown and "test-then-train Dice" in shown
    assert [(r["round"], r["id"], r["predicted_by"], r["trained_by"], r["in_best"]) for r in ws.rounds()] == \
        [(1, first, "v1", "v2", True)]


def test_corrections_accepted_while_training_are_queued(loop_ws, command):
    """Corrections accepted while a training holds the training lock are kept, wait in the queue
    and are all taken by the next training."""
    ws, pairs = loop_ws
    training = subprocess.Popen([sys.executable, "-m", "ExtremeAugLogic", "train", str(ws.path), "--minutes", "0.05",
                                 "--quiet", "--no-predict-worklist", *SETS], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while ws.training_pid() is None or (json.loads(ws.status_path.read_text()).get("phase") != "training"):
            assert training.poll() is None and time.monotonic() < deadline, training.communicate()
            time.sleep(0.1)
        ws.add_case(*pairs["w1"], case_id="w1", split="train")   # the training has loaded its cases already
        assert ws.training_pid() is not None
        code, _, err = command("add", ws.path, "--image", pairs["w2"][0], "--label", pairs["w2"][1], "--case-id", "w2",
                               "--split", "train")
        assert code == 0, err
    finally:
        out, err = training.communicate(timeout=120)
    assert training.returncode == 0, err
    assert ws.version("v2")["cases_seen"] == ["first"] and ws.best_version() == "v2"
    assert ws.queued() == ["w1", "w2"] and "queued: 2 (w1, w2)" in command("status", ws.path)[1]
    assert command("train", ws.path, "--iterations", 2, "--quiet", "--no-predict-worklist", *SETS)[0] == 0
    assert ws.version("v3")["cases_seen"] == ["first", "w1", "w2"] and ws.queued() == []
    assert [r["trained_by"] for r in ws.rounds()] == ["v3", "v3"]


# ---------------------------------------------------------------- waiting predictions and kills

def test_a_killed_worklist_prediction_leaves_no_half_file(loop_ws, command):
    """SIGKILL in the middle of ``predict --worklist``: every waiting prediction reads as ready
    (complete) or none, never a torn file; the next run removes the leftovers and redoes the rest."""
    ws, _ = loop_ws
    folder = ws.path / contract.WORKLIST_PREDICTIONS_DIR
    shutil.rmtree(folder)
    child = subprocess.Popen([sys.executable, "-m", "ExtremeAugLogic", "predict", str(ws.path), "--worklist"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (folder.is_dir() and any(folder.iterdir())):
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(30)
    rows = ws.worklist_state()
    assert {r["state"] for r in rows} <= {"ready", "none"} and "none" in {r["state"] for r in rows}
    for row in rows:
        if row["state"] == "ready":
            read_label(row["prediction"], allow_empty=True)              # complete
    for path in folder.glob("*.nii.gz"):
        if not path.name.startswith("."):
            read_label(path, allow_empty=True)                           # a final name is never half written
    (folder / ".w4.nii.abc123.nii.gz").write_bytes(b"torn")              # what a kill during a write leaves
    assert command("predict", ws.path, "--worklist")[0] == 0
    assert [r["state"] for r in ws.worklist_state()] == ["ready"] * 4
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_a_replaced_prediction_loses_its_record_first(loop_ws, monkeypatch):
    """Redoing a stale prediction removes its record before the new label map is written, so a
    failure half way leaves the scan without a prediction, never an old record beside a new map."""
    from ExtremeAugLogic.inference import worklist

    ws, _ = loop_ws
    for row in ws.worklist_state():
        record_path = ws.worklist_prediction_files(row["id"])[1]
        record = json.loads(record_path.read_text())
        record_path.write_text(json.dumps({**record, "version": "v0"}))  # made by a model that is no longer best
    assert {r["state"] for r in ws.worklist_state()} == {"stale"}
    old = ws.worklist_prediction_files("w1")[0].read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(worklist.imageio, "write_image", killed)
    with pytest.raises(KeyboardInterrupt):
        worklist.predict_worklist(ws, "cpu")
    assert [r["state"] for r in ws.worklist_state()] == ["none", "stale", "stale", "stale"]
    assert ws.worklist_prediction_files("w1")[0].read_bytes() == old
    monkeypatch.undo()
    assert len(worklist.predict_worklist(ws, "cpu")) == 4                  # the lock was released
    assert {r["state"] for r in ws.worklist_state()} == {"ready"}


# ---------------------------------------------------------------- the console (real MRML)

def _spoil(truth_file, missed: bool) -> sitk.Image:
    """The true label map, or (``missed``) the same with structure 1 missed."""
    truth = read_label(truth_file)
    array = sitk.GetArrayFromImage(truth)
    if missed:
        array[array == 1] = 0
    spoiled = sitk.GetImageFromArray(array)
    spoiled.CopyInformation(truth)
    return spoiled


def test_a_trial_compares_both_models_on_the_same_corrected_scan(loop_ws):
    """A new best on trial keeps its rival's waiting predictions; the correction scores both on
    that scan; a model dropped after its trial hands the worklist back to its rival's predictions."""
    ws, pairs = loop_ws
    ws.add_case(*pairs["w1"], case_id="w1", split="train")  # corrected from v1's waiting prediction
    assert ws.case("w1")["predicted_by"] == "v1" and "previous_model_scores" not in ws.case("w1")
    assert cli.main(["train", str(ws.path), "--iterations", "2", "--quiet", *SETS]) == 0
    assert ws.best_version() == "v2" and ws.version("v2")["trial_against"] == "v1"
    for case_id in ("w2", "w3", "w4"):  # the predictor kept v1's predictions beside v2's
        assert ws.waiting_prediction(case_id)["version"] == "v2"
        assert contract.read_previous_prediction(ws.path, case_id)["version"] == "v1"

    # w2: v2's prediction is right, v1's missed a structure: v2 stays, judged on the same scan
    write_image(_spoil(pairs["w2"][1], False), ws.worklist_prediction_files("w2")[0])
    write_image(_spoil(pairs["w2"][1], True), contract.previous_prediction_files(ws.path, "w2")[0])
    decided = ws.add_case(*pairs["w2"], case_id="w2", split="train")
    assert decided["trial"].startswith("v2 stays the best model") and "over the same 1 scan" in decided["trial"]
    assert decided["test_scores"]["mean_dice"] == 1.0
    assert decided["previous_model_scores"]["version"] == "v1" and decided["previous_model_scores"]["mean_dice"] < 1.0
    assert not any(contract.previous_prediction_files(ws.path, "w2")[i].exists() for i in (0, 1))

    # v3 on trial against v2; on w3 v3 is worse than v2 was: v2 is back, and so are its predictions
    assert cli.main(["train", str(ws.path), "--iterations", "2", "--quiet", *SETS]) == 0
    assert ws.best_version() == "v3" and ws.version("v3")["trial_against"] == "v2"
    assert contract.read_previous_prediction(ws.path, "w4")["version"] == "v2"
    write_image(_spoil(pairs["w3"][1], True), ws.worklist_prediction_files("w3")[0])
    write_image(_spoil(pairs["w3"][1], False), contract.previous_prediction_files(ws.path, "w3")[0])
    decided = ws.add_case(*pairs["w3"], case_id="w3", split="train")
    assert decided["trial"].startswith("v2 is the best model again") and "same 1 scan" in decided["trial"]
    assert decided["trial"].endswith("its waiting predictions of 1 worklist scan(s) are back")
    assert ws.best_version() == "v2"
    assert [(r["id"], r["state"], r["version"]) for r in ws.worklist_state()] == [("w4", "ready", "v2")]
    assert contract.read_previous_prediction(ws.path, "w4") is None
    assert Workspace.open(ws.path).case("w3")["previous_model_scores"]["version"] == "v2"  # the manifest reads back


def test_console_rounds_queue_chart_and_versions(loop_ws):
    """``loadNextScan`` -> ``acceptCorrection`` -> ``rounds()``, ``queued()``, ``roundsChart()``,
    ``modelVersions()``: what the panel shows, equal to the engine's view."""
    from ExtremeAugLib import status_text
    from ExtremeAugLib.headless_scene import HeadlessScene
    from ExtremeAugLib.loop_logic import LoopLogic

    ws, _ = loop_ws
    headless = HeadlessScene()
    try:
        logic = LoopLogic(pythonExecutable=sys.executable, tempDirectory=ws.path.parent / "tmp")
        logic.setWorkspace(ws.path)
        expected = ws.worklist_state(contract.SUGGESTED_ORDER)[0]["id"]
        assert logic.rounds() == [] and logic.roundsChart() is None and logic.queued() == []
        volume, segmentation = logic.loadNextScan(headless.scene)
        assert volume.GetName() == expected
        loaded = segmentation.GetAttribute("ExtremeAug.PredictionFile")
        assert not loaded.startswith(str(ws.path))                       # a private copy of the waiting prediction
        case_id, changed = logic.acceptCorrection(volume, segmentation)  # accepted unedited
        assert case_id == expected and changed == 0
        case = ws.case(case_id)
        assert case["predicted_by"] == "v1" and case["test_scores"]["mean_dice"] == 1.0
        assert logic.rounds() == ws.rounds() and logic.rounds()[0]["id"] == case_id
        assert logic.queued() == [case_id] and logic.roundsChart() == ws.rounds_chart_path
        v1 = logic.modelVersions()[0]
        assert (v1["scoreSource"], v1["score"], v1["testScans"]) == ("test-then-train", 1.0, 1)
        assert status_text.describeScore(v1) == "1.000 (test-then-train, 1 scan)"
        assert status_text.roundCells(logic.rounds()[0])[:4] == ("1", case_id, "v1", "1.000")
    finally:
        headless.close()


def test_a_warm_retrain_defaults_to_a_quarter_of_the_first_budget():
    """The engine's default for --init-from and the panel's Retrain follow the loop benchmark."""
    from ExtremeAugLib.loop_logic import LoopLogic
    from ExtremeAugLogic.training.trainer import default_minutes

    assert default_minutes(gpu=False, warm_start=False) == 8.0 and default_minutes(gpu=True, warm_start=False) == 1.0
    assert default_minutes(gpu=False, warm_start=True) == 2.0 and default_minutes(gpu=True, warm_start=True) == 0.25
    assert LoopLogic.retrainMinutes(8.0) == 2.0


def test_train_init_from_without_a_budget_takes_the_retrain_default(loop_ws):
    """``train --init-from best`` with no budget records a quarter of the CPU default (2 min); stopped at once."""
    ws, _ = loop_ws
    process = subprocess.Popen([sys.executable, "-m", "ExtremeAugLogic", "train", str(ws.path), "--init-from", "best",
                                "--device", "cpu", "--quiet", *SETS], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(Workspace.open(ws.path).versions()) < 2:
            time.sleep(0.2)
        settings = Workspace.open(ws.path).version("v2")["settings"]
        assert settings["budget_minutes"] == 2.0 and settings["budget_iterations"] is None
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
