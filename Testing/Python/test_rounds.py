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
