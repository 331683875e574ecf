"""A workspace under stress: two trainers at once, a trainer killed without a word, refused
commands that must change nothing, and a workspace from someone else that must not lead outside."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import SimpleITK as sitk

from ExtremeAugLogic import contract
from ExtremeAugLogic.demo import phantom
from ExtremeAugLogic.workspace import Workspace
from ExtremeAugLogic.workspace.imageio import write_image
from ExtremeAugLogic.workspace.status import read_status
from ExtremeAugLib import workspace_view
from ExtremeAugLib.loop_logic import LoopLogic

SMALL = {"inplane_size": 64, "patch_size": 32, "stride": 16, "base_features": 4, "depth": 3,
         "max_features": 16, "batch_size": 4}
SET = [arg for key, value in SMALL.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


def engine(*args, **kw):
    return [sys.executable, "-m", "ExtremeAugLogic", *map(str, args)]


def run(*args, timeout=300):
    return subprocess.run(engine(*args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def snapshot(folder: Path) -> dict:
    """Every file's bytes under ``folder`` (the lock file's too)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scans")
    paths = []
    for seed in (21, 22):
        image, label = phantom.make_phantom(seed, shape=(48, 48, 16), spacing=(4.0, 4.0, 4.0))
        paths.append((folder / f"s{seed}_image.nii.gz", folder / f"s{seed}_label.nii.gz"))
        write_image(image, paths[-1][0])
        write_image(sitk.Cast(label > 0, sitk.sitkUInt8), paths[-1][1])
    return paths


@pytest.fixture
def ws(tmp_path, scans):
    workspace = Workspace.create(tmp_path / "ws", structure_names={1: "bone"})
    workspace.add_case(*scans[0], case_id="one")
    return workspace


def test_two_trainings_started_together_one_runs_one_is_refused(ws):
    args = engine("train", ws.path, "--iterations", 60, "--quiet", *SET)
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = [(p.wait(300), *p.communicate()) for p in (first, second)]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, _, err in results if code == 2).strip().splitlines()
    assert len(refused) == 1 and "training is already running" in refused[0] and "pid" in refused[0]
    assert [v["status"] for v in ws.versions()] == ["done"]  # exactly one version: the refused one wrote none


def test_the_kernel_frees_the_lock_of_a_killed_trainer(ws):
    trainer = subprocess.Popen(engine("train", ws.path, "--iterations", 100000, "--quiet", *SET),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state = read_status(ws.status_path) or {}
            if state.get("phase") == "training" and state.get("iteration", 0) > 0:
                break
            time.sleep(0.2)
        assert contract.lock_holder(ws.lock_path) == trainer.pid
        assert ws.versions()[-1]["status"] == "training"
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
    # no word from the trainer: shown as interrupted on both sides, lock free
    assert contract.lock_holder(ws.lock_path) is None
    assert ws.versions()[-1]["status"] == "interrupted"
    assert workspace_view.versionRows(ws.path)[-1]["status"] == "interrupted"
    shown = run("status", ws.path)
    assert shown.returncode == 0 and "v1: interrupted" in shown.stdout
    # killed before its first checkpoint: nothing to resume, and the refusal writes nothing
    before = snapshot(ws.path)
    refused = run("train", ws.path, "--resume")
    assert refused.returncode == 2 and "nothing to resume" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert snapshot(ws.path) == before  # status.json, manifest, lock file: byte-identical
    # the next training takes the lock and records the dead one for good
    done = run("train", ws.path, "--iterations", 3, "--quiet", *SET)
    assert done.returncode == 0, done.stderr
    assert [v["status"] for v in ws.manifest()["versions"]] == ["interrupted", "done"]


def test_an_interrupted_version_with_a_checkpoint_resumes(ws):
    stopper = subprocess.Popen(engine("train", ws.path, "--iterations", 100000, "--quiet", *SET),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (read_status(ws.status_path) or {}).get("iteration", 0) < 2:
        time.sleep(0.2)
    stopper.send_signal(signal.SIGTERM)  # stops with a checkpoint
    assert stopper.wait(60) == 0
    # as if the trainer had died after that checkpoint: recorded "training" by a process that is gone
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    ws.update_version("v1", status="training", pid=int(dead.stdout))
    assert ws.version("v1")["status"] == "interrupted"
    checkpointed = ws.version("v1")["iterations"]
    assert checkpointed >= 2
    resumed = run("train", ws.path, "--resume", "--iterations", checkpointed + 3, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert [v["status"] for v in ws.versions()] == ["done"]  # the same version went on, none was added
    assert ws.version("v1")["iterations"] == checkpointed + 3


@pytest.mark.parametrize("args,message", [
    (["--init-from", "v9"], "v9: no such model version"),
    (["--resume"], "nothing to resume"),
    (["--minutes", "-1"], "must be positive"),
    (["--model", "3d", "--device", "cuda:0"], "CUDA is not available"),
])
def test_a_refused_training_writes_nothing(ws, args, message):
    if message == "CUDA is not available" and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    before = snapshot(ws.path)
    refused = run("train", ws.path, *args)
    assert refused.returncode == 2 and message in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert snapshot(ws.path) == before


# ---------------------------------------------------------------- untrusted workspaces

@pytest.fixture(scope="module")
def trained(tmp_path_factory, scans):
    workspace = Workspace.create(tmp_path_factory.mktemp("trained") / "ws", structure_names={1: "bone"})
    workspace.add_case(*scans[0], case_id="one")
    done = run("train", workspace.path, "--iterations", 3, "--quiet", *SET)
    assert done.returncode == 0, done.stderr
    return workspace


def _tampered(trained, tmp_path, change):
    copy = tmp_path / "shared" / "ws"
    shutil.copytree(trained.path, copy)
    manifest = json.loads((copy / contract.MANIFEST_NAME).read_text())
    change(manifest, copy)
    (copy / contract.MANIFEST_NAME).write_text(json.dumps(manifest))
    return copy


def _escaped_model(manifest, copy):
    outside = copy.parent / "escaped-model"
    shutil.copytree(copy / "models" / "v1", outside)  # a working model, outside the workspace
    manifest["best_version"] = "../../escaped-model"


def _parent_loop(manifest, copy):
    manifest["versions"].append({**manifest["versions"][0], "name": "v2", "parent": "v3"})
    manifest["versions"].append({**manifest["versions"][0], "name": "v3", "parent": "v2"})


def _escaping_case(manifest, copy):
    manifest["cases"][0]["image"] = "../../outside_0000.nii.gz"


def _version_dots(manifest, copy):
    manifest["versions"][0]["name"] = "..v1"


def _missing_best(manifest, copy):
    manifest["best_version"] = "v7"


@pytest.mark.parametrize("change,field", [(_escaped_model, "best_version"), (_parent_loop, "parent"),
                                          (_escaping_case, "cases[0].image"), (_version_dots, "versions[0].name"),
                                          (_missing_best, "best_version")])
def test_a_tampered_manifest_is_refused_everywhere_and_nothing_changes(trained, scans, tmp_path, change, field):
    copy = _tampered(trained, tmp_path, change)
    before = snapshot(copy.parent)
    manifest_path = copy / contract.MANIFEST_NAME
    for args in (["predict", copy, "--image", scans[1][0], "--output", tmp_path / "p.nii.gz"], ["status", copy],
                 ["train", copy, "--iterations", 1], ["add", copy, "--image", scans[1][0], "--label", scans[1][1]]):
        refused = run(*args)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1, (args, refused.stderr)
        assert str(manifest_path) in lines[0] and field in lines[0], lines[0]
    assert not (tmp_path / "p.nii.gz").exists()
    assert snapshot(copy.parent) == before
    # the Slicer side refuses the same manifest with the same line
    problem = workspace_view.manifestProblem(copy)
    assert problem and field in problem and workspace_view.versionRows(copy) == []
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        LoopLogic(pythonExecutable=sys.executable).setWorkspace(copy)


def test_a_config_naming_a_folder_outside_is_refused(trained, scans, tmp_path):
    copy = _tampered(trained, tmp_path, lambda m, c: None)
    config_path = copy / "models" / "v1" / contract.CONFIG_NAME
    config = json.loads(config_path.read_text())
    config["settings"]["offline_dir"] = str(tmp_path / "elsewhere")
    config_path.write_text(json.dumps(config))
    refused = run("predict", copy, "--image", scans[1][0], "--output", tmp_path / "p.nii.gz")
    assert refused.returncode == 2 and str(config_path) in refused.stderr and "offline_dir" in refused.stderr


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: what a hostile model.pt would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("target", ["model.pt", "checkpoint.pt"])
def test_a_pickled_payload_in_weights_never_runs(trained, scans, tmp_path, target):
    import torch

    copy = _tampered(trained, tmp_path, lambda m, c: None)
    marker = tmp_path / "payload-ran"
    torch.save({"model": _Payload(str(marker))}, copy / "models" / "v1" / target)
    pickle.loads(pickle.dumps(_Payload(str(tmp_path / "control"))))  # the payload is real: it runs when unpickled
    assert (tmp_path / "control").exists()
    if target == "model.pt":
        refused = run("predict", copy, "--image", scans[1][0], "--output", tmp_path / "p.nii.gz")
    else:
        record = Workspace.open(copy).manifest()["versions"][0]
        Workspace.open(copy).update_version(record["name"], status="stopped")
        refused = run("train", copy, "--resume", "--iterations", 1)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and "refused to load" in lines[0], refused.stderr
    assert not marker.exists()
