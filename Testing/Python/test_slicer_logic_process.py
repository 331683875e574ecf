"""The module Logic's process side: engine command lists, status parsing, stopping a real
process tree, and the Logic's training-set steps through the real engine CLI on real MRML."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO_ROOT / "ExtremeAug"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

import psutil  # noqa: E402  a test requirement

from ExtremeAugLib import engine_cli, training_process, workspace_view  # noqa: E402
from ExtremeAugLib.training_process import EngineProcess, readStatus  # noqa: E402

NASTY = "scan 'one' \"two\" $HOME; rm -rf ~ & ünï"
PYTHON = "/opt/my python/bin/python 'x'"


# ------------------------------------------------------------ command lists

def test_train_command_is_a_list_with_paths_intact(tmp_path):
    workspace = tmp_path / NASTY
    args = engine_cli.trainCommand(PYTHON, workspace, minutes=2.5, level=50, device="cuda:1",
                                   initFrom="best", modelType="3d")
    assert args == [PYTHON, "-m", "ExtremeAugLogic", "train", str(workspace), "--minutes", "2.5",
                    "--level", "50", "--device", "cuda:1", "--init-from", "best", "--model", "3d"]
    assert all(isinstance(a, str) for a in args)
    args = engine_cli.trainCommand(PYTHON, workspace, iterations=30, level=0, resume=True)
    assert args[4:] == [str(workspace), "--iterations", "30", "--level", "0", "--resume"]
    assert engine_cli.trainCommand(PYTHON, workspace, minutes=3)[-2:] == ["--minutes", "3"]


@pytest.mark.parametrize("options, message", [
    (dict(minutes=1, iterations=5), "not both"),
    (dict(minutes=0), "positive"),
    (dict(iterations=0), "at least 1"),
    (dict(level=-1), "level"),
    (dict(device="gpu"), "Device"),
    (dict(device="cpu:0"), "Device"),
    (dict(modelType="4d"), "Model type"),
])
def test_train_command_refuses_bad_options(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        engine_cli.trainCommand(PYTHON, tmp_path, **options)


def test_add_predict_evaluate_commands(tmp_path):
    ws, image, label, pred = (tmp_path / NASTY / n for n in ("ws", "i m.nii.gz", "l'.nii.gz", 'p".nii.gz'))
    args = engine_cli.addCommand(PYTHON, ws, image, label, caseId="case_1", correctedFrom=pred,
                                 names={1: "L1", "2": "Disc \"L1-L2\""})
    assert args[3:] == ["add", str(ws), "--image", str(image), "--label", str(label), "--case-id", "case_1",
                        "--corrected-from", str(pred), "--names", args[-1]]
    assert json.loads(args[-1]) == {"1": "L1", "2": 'Disc "L1-L2"'}
    args = engine_cli.predictCommand(PYTHON, ws, image, pred, version="v2", device="cpu")
    assert args[3:] == ["predict", str(ws), "--image", str(image), "--output", str(pred),
                        "--version", "v2", "--device", "cpu"]
    assert engine_cli.evaluateCommand(PYTHON, pred, label)[3:] == ["evaluate", "--prediction", str(pred),
                                                                   "--reference", str(label)]
    assert engine_cli.initCommand(PYTHON, ws) == [PYTHON, "-m", "ExtremeAugLogic", "init", str(ws)]


def test_engine_receives_nasty_paths_intact(tmp_path):
    """A real engine run: the workspace lands exactly at a path with spaces, quotes and $."""
    workspace = tmp_path / NASTY
    engineRoot = engine_cli.findEngineRoot(MODULE_DIR)
    assert engineRoot == REPO_ROOT
    engine_cli.runEngine(engine_cli.initCommand(sys.executable, workspace), engineRoot, timeout=120)
    assert workspace_view.isWorkspace(workspace)
    assert [p.name for p in tmp_path.iterdir()] == [NASTY]


def test_engine_error_is_its_last_stderr_line(tmp_path):
    args = engine_cli.addCommand(sys.executable, tmp_path / "not a workspace", tmp_path / "a", tmp_path / "b")
    with pytest.raises(engine_cli.EngineError, match="not an ExtremeAug workspace"):
        engine_cli.runEngine(args, REPO_ROOT, timeout=120)


def test_engine_environment_puts_engine_first():
    env = engine_cli.engineEnvironment("/engine root", {"PYTHONPATH": "/a" + os.pathsep + "/b"})
    assert env["PYTHONPATH"].split(os.pathsep) == ["/engine root", "/a", "/b"]
    assert env["PYTHONUNBUFFERED"] == "1"


def test_engine_process_refuses_shell_strings():
    with pytest.raises(TypeError, match="argument list"):
        EngineProcess("python -m ExtremeAugLogic train ws")


# ------------------------------------------------------------------ status

def test_status_missing_file(tmp_path):
    status = readStatus(tmp_path)
    assert status["phase"] == "unknown" and status["iteration"] == 0 and status["loss"] is None
    assert "no training" in status["message"]
    assert readStatus(tmp_path / "no such folder")["phase"] == "unknown"


@pytest.mark.parametrize("text", ['{"phase": "training", "iter', "", "not json", "[1, 2]", "null", "\x00\x01"])
def test_status_partial_or_corrupt_file(tmp_path, text):
    (tmp_path / "status.json").write_text(text, encoding="utf-8")
    status = readStatus(tmp_path)
    assert status["phase"] == "unknown"
    assert set(training_process.DEFAULT_STATUS) <= set(status)


def test_status_normal_and_badly_typed_fields(tmp_path):
    data = {"phase": "training", "iteration": 120, "total": 400, "loss": 0.42, "val_dice": None, "eta_s": 33.5,
            "version": "v3", "error": None, "pid": 1234, "started_at": "2026-01-01T00:00:00+00:00",
            "updated_at": "2026-01-01T00:01:00+00:00", "message": "training"}
    (tmp_path / "status.json").write_text(json.dumps(data), encoding="utf-8")
    assert readStatus(tmp_path) == data  # an older engine's status (no world_size) reads as written
    data.update(iteration="many", loss="NaN", total=None, eta_s=[1], pid=True)
    (tmp_path / "status.json").write_text(json.dumps(data), encoding="utf-8")
    status = readStatus(tmp_path)
    assert status["iteration"] == 0 and status["loss"] is None and status["total"] == 0
    assert status["eta_s"] is None and status["pid"] is None and status["phase"] == "training"


# ------------------------------------------------------- process tree stop

TREE_SCRIPT = textwrap.dedent("""
    import signal, subprocess, sys, time
    ignore = sys.argv[2] == "ignore"
    if ignore:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    code = "import signal, time\\n" + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n" if ignore else "") + \\
        "time.sleep(600)"
    # One grandchild in our process group, one that escapes it into its own session.
    kids = [subprocess.Popen([sys.executable, "-c", code]),
            subprocess.Popen([sys.executable, "-c", code], start_new_session=True)]
    with open(sys.argv[1], "w") as f:
        f.write(" ".join(str(k.pid) for k in kids))
    time.sleep(600)
""")


def startTree(tmp_path, mode, stopTimeout):
    script = tmp_path / "tree.py"
    script.write_text(TREE_SCRIPT)
    pidsFile = tmp_path / "pids.txt"
    process = EngineProcess([sys.executable, script, pidsFile, mode], logPrefix=tmp_path / "logs" / "tree",
                            stopTimeout=stopTimeout).start()
    deadline = time.time() + 30
    while not (pidsFile.is_file() and len(pidsFile.read_text().split()) == 2):
        assert time.time() < deadline, "the child did not start its grandchildren"
        time.sleep(0.05)
    pids = [process.pid] + [int(p) for p in pidsFile.read_text().split()]
    assert all(alive(pid) for pid in pids)
    return process, pids


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def waitGone(pids, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_stop_ends_the_whole_tree(tmp_path):
    process, pids = startTree(tmp_path, "normal", stopTimeout=5)
    started = time.time()
    assert process.stop()
    assert waitGone(pids, 2) == []
    assert time.time() - started < 5
    assert not process.isRunning()


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_stop_kills_a_tree_that_ignores_sigterm(tmp_path):
    process, pids = startTree(tmp_path, "ignore", stopTimeout=1)
    started = time.time()
    assert process.stop()
    assert waitGone(pids, 2) == []
    assert 0.9 < time.time() - started < 5


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_non_blocking_stop_then_kill_when_overdue(tmp_path):
    process, pids = startTree(tmp_path, "ignore", stopTimeout=0.5)
    process.requestStop()
    assert not process.killIfOverdue()  # too early: no kill yet
    time.sleep(0.6)
    assert process.killIfOverdue()
    assert waitGone(pids, 3) == []


def test_attach_to_a_process_started_elsewhere_and_stop_it(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        attached = EngineProcess.attach(child.pid, stopTimeout=2)
        assert attached.isRunning()
        assert attached.stop()
        child.wait(5)
        assert not attached.isRunning()
    finally:
        child.kill()


def test_last_error_from_stderr_and_exit_code(tmp_path):
    code = "import sys; print('progress 1/2'); print('warming up', file=sys.stderr); " \
           "print('error: scan.nii.gz: not 3D', file=sys.stderr); sys.exit(2)"
    process = EngineProcess([sys.executable, "-c", code], logPrefix=tmp_path / "run").start()
    assert process.wait(30) == 2
    assert process.lastError() == "error: scan.nii.gz: not 3D"
    assert process.stdoutTail() == "progress 1/2"
    assert process.lastError({"error": "CUDA out of memory"}) == "CUDA out of memory"
    silent = EngineProcess([sys.executable, "-c", "import sys; sys.exit(3)"], logPrefix=tmp_path / "silent").start()
    silent.wait(30)
    assert silent.lastError() == "engine exited with code 3"


# ------------------------------------------------- Logic on real MRML + engine

import slicer  # noqa: E402  slicer-core is a test requirement: CI fails without it, never skips


@pytest.fixture
def loop(tmp_path):
    from ExtremeAugLib.headless_scene import HeadlessScene
    from ExtremeAugLib.loop_logic import LoopLogic

    headless = HeadlessScene()
    logic = LoopLogic(pythonExecutable=sys.executable, engineRoot=REPO_ROOT, tempDirectory=tmp_path / "tmp")
    logic.setWorkspace(tmp_path / "work space 'A'")
    yield logic, headless.scene
    headless.close()


def phantomScanAndDelineation(scene, name, seed=0):
    """A small scan and a two-structure delineation (volume + segmentation nodes)."""
    from ExtremeAugLib import mrml_bridge

    rng = np.random.default_rng(seed)
    labels = np.zeros((8, 20, 24), np.uint8)
    labels[2:6, 4:10, 3:9] = 1
    labels[2:6, 11:17, 12:20] = 2
    scan = (labels * 50 + rng.normal(0, 5, labels.shape)).astype(np.float32)
    image = sitk.GetImageFromArray(scan)
    image.SetSpacing((0.8, 0.8, 3.0))
    image.SetOrigin((10.0, -5.0, 2.0))
    volumeNode = mrml_bridge.imageToVolumeNode(image, scene, name)
    labelImage = sitk.GetImageFromArray(labels)
    labelImage.CopyInformation(image)
    segmentationNode = mrml_bridge.labelImageToSegmentation(labelImage, volumeNode, {1: "L1", 2: "L2"},
                                                            nodeName=f"{name} delineation")
    return volumeNode, segmentationNode, labels


def test_logic_adds_training_scans_through_the_engine(loop):
    logic, scene = loop
    with pytest.raises(ValueError, match="at least one delineated scan"):
        logic.startTraining(iterations=1)
    volumeNode, segmentationNode, labels = phantomScanAndDelineation(scene, "Patient 7 / T2")
    caseId = logic.addTrainingScan(volumeNode, segmentationNode)
    assert caseId == "Patient_7_T2"
    assert logic.caseIds() == [caseId]
    assert logic.structureNames() == {1: "L1", 2: "L2"}
    stored = sitk.ReadImage(str(logic.workspace / "labelsTr" / f"{caseId}.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(stored), labels)
    with pytest.raises(ValueError, match="already training case"):
        logic.addTrainingScan(volumeNode, segmentationNode)

    # Same name, new scan: a unique id; segment order differs but names keep their values.
    volume2, segmentation2, labels2 = phantomScanAndDelineation(scene, "Patient 7 / T2", seed=1)
    segmentation2.GetSegmentation().SetSegmentIndex(segmentation2.GetSegmentation().GetNthSegmentID(1), 0)
    assert logic.addTrainingScan(volume2, segmentation2) == "Patient_7_T2_2"
    stored = sitk.ReadImage(str(logic.workspace / "labelsTr" / "Patient_7_T2_2.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(stored), labels2)


def test_logic_refuses_what_it_cannot_do(loop):
    logic, scene = loop
    volumeNode, segmentationNode, _ = phantomScanAndDelineation(scene, "scan")
    with pytest.raises(ValueError, match="not an ExtremeAug prediction"):
        logic.acceptCorrection(volumeNode, segmentationNode)
    with pytest.raises(ValueError, match="No trained model"):
        logic.startSegmentScan(volumeNode)
    status = logic.trainingStatus()
    assert status["running"] is False and status["phase"] == "unknown"
    logic.setWorkspace("")
    with pytest.raises(ValueError, match="workspace"):
        logic.addTrainingScan(volumeNode, segmentationNode)


def test_accept_correction_counts_changed_voxels(loop, tmp_path):
    """A prediction node (as the prediction step makes it) edited, then accepted."""
    from ExtremeAugLib import mrml_bridge

    logic, scene = loop
    volumeNode, delineation, labels = phantomScanAndDelineation(scene, "first")
    logic.addTrainingScan(volumeNode, delineation)
    scan2, _, truth = phantomScanAndDelineation(scene, "second", seed=3)
    predicted = truth.copy()
    predicted[3, 4:10, 3:5] = 0  # the model missed part of L1
    predictionImage = sitk.GetImageFromArray(predicted)
    predictionImage.CopyInformation(mrml_bridge.volumeNodeToImage(scan2))
    predictionFile = tmp_path / "prediction.nii.gz"
    sitk.WriteImage(predictionImage, str(predictionFile))
    predictionNode = logic._predictionToSegmentation(scan2, predictionFile, "v1")
    assert predictionNode.GetAttribute("ExtremeAug.ModelVersion") == "v1"

    # The clinician paints the missing voxels back into L1.
    segmentId = predictionNode.GetSegmentation().GetSegmentIdBySegmentName("L1")
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        mrml_bridge.maskToOrientedImage(truth == 1, scan2), predictionNode, segmentId,
        slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    caseId, changed = logic.acceptCorrection(scan2, predictionNode)
    assert changed == int(np.count_nonzero(predicted != truth)) == 12
    manifest = workspace_view.readManifest(logic.workspace)
    entry = next(c for c in manifest["cases"] if c["id"] == caseId)
    assert entry["status"] == "corrected" and entry["changed_voxels"] == 12
    with pytest.raises(ValueError, match="already training case"):
        logic.acceptCorrection(scan2, predictionNode)



def test_action_blockers_say_why(loop):
    logic, scene = loop
    blockers = logic.actionBlockers(None, None)
    assert set(blockers) == {"add", "worklist", "next", "train", "retrain", "segment", "edit", "accept"}
    assert blockers["add"] == "Select a scan first."
    assert blockers["edit"] == "Select or create a segmentation first."
    assert blockers["train"] == "Add a delineated scan first."
    assert blockers["segment"].startswith("Select a scan")
    volumeNode, segmentationNode, _ = phantomScanAndDelineation(scene, "scan")
    blockers = logic.actionBlockers(volumeNode, segmentationNode)
    assert blockers["add"] is None and blockers["edit"] is None
    assert blockers["segment"].startswith("No trained model")
    assert "not an ExtremeAug prediction" in blockers["accept"]
    logic.addTrainingScan(volumeNode, segmentationNode)
    blockers = logic.actionBlockers(volumeNode, segmentationNode)
    assert blockers["train"] is None
    assert "already training case" in blockers["add"]
    assert blockers["retrain"].startswith("No model to start from")
    assert logic.actionBlockers(volumeNode, None, predicting=True)["segment"] is None  # Cancel stays enabled
    logic.setWorkspace(None)
    assert logic.actionBlockers(volumeNode, segmentationNode)["add"] == "Choose a workspace folder first."


def test_training_status_from_our_own_processes(loop):
    """The Logic's view of a real engine-like process: starting, then failed with its stderr."""
    logic, scene = loop
    logic.workspace.mkdir(parents=True)
    old = dict(training_process.DEFAULT_STATUS, phase="done", pid=1, version="v1", message="old run")
    (logic.workspace / "status.json").write_text(json.dumps(old), encoding="utf-8")
    code = "import sys, time; time.sleep(1.5); print('error: CUDA error: no kernel image', file=sys.stderr); sys.exit(1)"
    process = EngineProcess([sys.executable, "-c", code], logPrefix=logic.workspace / "logs" / "t").start()
    logic._trainingProcesses[logic.workspace] = process
    status = logic.trainingStatus()
    assert status["running"] and status["phase"] == "starting"  # the old file is not ours
    assert logic.isTraining()
    process.wait(30)
    status = logic.trainingStatus()
    assert not status["running"] and status["phase"] == "failed"
    assert status["error"] == "error: CUDA error: no kernel image"

    # A status file our process wrote: taken as is, and the chart history grows.
    stopper = EngineProcess([sys.executable, "-c", "import time; time.sleep(60)"], logPrefix=logic.workspace / "s").start()
    logic._trainingProcesses[logic.workspace] = stopper
    for iteration, loss in ((10, 0.9), (20, 0.7), (20, 0.7), (30, 0.5)):
        live = dict(old, phase="training", pid=stopper.pid, iteration=iteration, total=100, loss=loss, val_dice=None)
        (logic.workspace / "status.json").write_text(json.dumps(live), encoding="utf-8")
        status = logic.trainingStatus()
    assert status["phase"] == "training" and status["iteration"] == 30
    assert logic.trainingHistory == [(10, 0.9, None), (20, 0.7, None), (30, 0.5, None)]
    assert logic.stopTraining(wait=True)
    assert logic.trainingStatus()["phase"] == "stopped"


def test_new_case_ids_are_safe_and_unique(tmp_path):
    assert workspace_view.newCaseId(tmp_path, "Patient 7 / T2 (ax)") == "Patient_7_T2_ax"
    assert workspace_view.newCaseId(tmp_path, "..") == "case"
    assert workspace_view.newCaseId(tmp_path, "x" * 100) == "x" * 60
    (tmp_path / "extremeaug.json").write_text(json.dumps({"cases": [{"id": "scan"}, {"id": "SCAN_2"}]}))
    assert workspace_view.newCaseId(tmp_path, "Scan") == "Scan_3"


def test_status_texts():
    from ExtremeAugLib import status_text

    assert status_text.formatDuration(None) == "-"
    assert status_text.formatDuration(42.4) == "42 s"
    assert status_text.formatDuration(725) == "12 min 5 s"
    assert status_text.formatDuration(7380) == "2 h 03 min"
    status = dict(training_process.DEFAULT_STATUS, phase="training", version="v2", iteration=50, total=200)
    assert status_text.describeStatus(status) == "training v2 (50/200)"
    assert status_text.progressPercent(status) == 25
    failed = dict(status, phase="failed", error="CUDA out of memory")
    assert status_text.describeStatus(failed) == "failed v2: CUDA out of memory"
    assert status_text.progressPercent(dict(status, phase="done")) == 100
    assert status_text.describeStatus(training_process.DEFAULT_STATUS) == "no training yet"


def test_training_chart_png(tmp_path):
    pytest.importorskip("matplotlib")
    from ExtremeAugLib.training_chart import renderChart

    assert renderChart([(1, 0.9, None)], tmp_path / "c.png") is None
    path = renderChart([(1, 0.9, None), (2, 0.8, 0.3), (3, 0.6, None), (4, 0.5, 0.6)], tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_status_written_by_a_launched_child_is_ours(loop):
    """Slicer's PythonSlicer is a launcher: the engine writing status.json is its child process."""
    logic, _ = loop
    logic.workspace.mkdir(parents=True)
    statusPath = logic.workspace / "status.json"
    child = ("import json, os, sys, time\n"
             "json.dump({'phase': 'training', 'pid': os.getpid(), 'iteration': 5, 'total': 50, 'loss': 0.5,"
             " 'started_at': '2000-01-01T00:00:00+00:00'}, open(sys.argv[1], 'w'))\n"
             "time.sleep(60)\n")
    launcher = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}, sys.argv[1]])"
    process = EngineProcess([sys.executable, "-c", launcher, statusPath], logPrefix=logic.workspace / "l").start()
    logic._trainingProcesses[logic.workspace] = process
    deadline = time.time() + 30
    while not statusPath.is_file() or readStatus(logic.workspace)["phase"] != "training":
        assert time.time() < deadline
        time.sleep(0.05)
    status = logic.trainingStatus()
    assert status["phase"] == "training" and status["iteration"] == 5 and status["running"]
    assert logic.stopTraining(wait=True)


def test_prediction_job_success_failure_and_cancel(loop, tmp_path):
    """PredictionJob around real child processes: node built on success, errors and Cancel reported."""
    from ExtremeAugLib import mrml_bridge
    from ExtremeAugLib.prediction_job import PredictionJob

    logic, scene = loop
    volumeNode, delineation, labels = phantomScanAndDelineation(scene, "scan")
    logic.addTrainingScan(volumeNode, delineation)  # the workspace now names structures L1, L2
    scanCopy = tmp_path / "scan copy.nii.gz"
    sitk.WriteImage(mrml_bridge.volumeNodeToImage(volumeNode), str(scanCopy))
    output = tmp_path / "pred out.nii.gz"
    writer = ("import sys, time, SimpleITK as sitk; time.sleep(0.5); "
              "sitk.WriteImage(sitk.ReadImage(sys.argv[1]), sys.argv[2])")
    labelFile = tmp_path / "label.nii.gz"
    sitk.WriteImage(mrml_bridge.segmentationToLabelImage(delineation, volumeNode)[0], str(labelFile))

    def makeJob(args, callback, temporary=()):
        process = EngineProcess([sys.executable, "-c", *args], logPrefix=tmp_path / f"job{len(calls)}")
        job = PredictionJob(process, volumeNode, output,
                            lambda path: logic._predictionToSegmentation(volumeNode, path, "v9"), callback, temporary)
        process.start()
        return job

    calls = []
    job = makeJob([writer, labelFile, output], calls.append, temporary=[scanCopy])
    assert not job.poll()  # still running
    assert job.wait(30) and calls == [job]
    node = job.result()
    assert mrml_bridge.segmentNames(node) == ["L1", "L2"]
    assert node.GetAttribute("ExtremeAug.PredictionFile") == str(output)
    assert np.array_equal(sitk.GetArrayFromImage(mrml_bridge.segmentationToLabelImage(node, volumeNode)[0]), labels)
    assert not scanCopy.exists()
    assert job.poll() and calls == [job]  # the callback runs once

    output.unlink()
    failing = makeJob(["import sys; print('error: v9: no such model version', file=sys.stderr); sys.exit(2)"],
                      calls.append)
    assert failing.wait(30)
    with pytest.raises(engine_cli.EngineError, match="no such model version"):
        failing.result()

    slow = makeJob(["import time; time.sleep(60)"], calls.append)
    started = time.time()
    slow.cancel()
    assert slow.wait(10) and slow.cancelled and time.time() - started < 6
    assert not slow.process.isRunning() and calls[-1] is slow
    with pytest.raises(RuntimeError, match="cancelled"):
        slow.result()
