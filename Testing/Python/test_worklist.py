"""The worklist: scans without a label wait in the workspace until they are labelled."""

import json
import subprocess
import sys

import pytest

from ExtremeAugLogic.errors import InputError
from ExtremeAugLogic.workspace import Workspace
from ExtremeAugLogic.workspace.imageio import write_image


def engine(*args):
    return subprocess.run([sys.executable, "-m", "ExtremeAugLogic", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def files(tmp_path, make_case):
    out = []
    for i in range(4):
        scan, label = make_case(seed=i)
        out.append((tmp_path / f"s{i}_image.nii.gz", tmp_path / f"s{i}_label.nii.gz"))
        write_image(scan, out[-1][0])
        write_image(label, out[-1][1])
    return out


def test_add_without_label_joins_the_worklist_only(tmp_path, files):
    ws = Workspace.create(tmp_path / "ws")
    ws.add_case(*files[0], case_id="first")
    added = engine("add", ws.path, "--image", files[1][0], "--case-id", "waiting")
    assert added.returncode == 0 and "worklist" in added.stdout, added.stderr
    entry = ws.case("waiting")
    assert entry["split"] == "worklist" and entry["label"] is None
    assert (ws.path / entry["image"]).is_file() and not (ws.path / "labelsTr" / "waiting.nii.gz").exists()
    assert json.loads(ws.dataset_json_path.read_text())["numTraining"] == 1
    assert [c["id"] for c in ws.worklist_cases()] == ["waiting"] and ws.case_ids("train") == ["first"]
    assert [c.case_id for c in ws.load_cases()] == ["first"]  # training never sees it
    shown = engine("status", ws.path)
    assert "1 in the worklist (waiting)" in shown.stdout


def test_labelling_a_worklist_scan_moves_it_into_training(tmp_path, files):
    ws = Workspace.create(tmp_path / "ws")
    ws.add_case(*files[0], case_id="first")
    ws.add_to_worklist(files[1][0], case_id="later")
    moved = engine("add", ws.path, "--image", files[1][0], "--label", files[1][1], "--case-id", "later")
    assert moved.returncode == 0, moved.stderr
    entry = ws.case("later")
    assert entry["split"] == "train" and entry["status"] == "delineated" and entry["label"] == "labelsTr/later.nii.gz"
    assert [c["id"] for c in ws.cases()].count("later") == 1 and ws.worklist_cases() == []
    assert sorted(c.case_id for c in ws.load_cases("train")) == ["first", "later"]


def test_worklist_scans_do_not_move_the_validation_split(tmp_path, files):
    ws = Workspace.create(tmp_path / "ws")
    ws.add_case(*files[0], case_id="a")
    for i in range(3):
        ws.add_to_worklist(files[1][0], case_id=f"w{i}")
    ws.add_case(*files[1], case_id="b")
    third = ws.add_case(*files[2], case_id="c")
    assert third["split"] == "validation"  # the third labelled case, as without a worklist


@pytest.mark.parametrize("args,message", [
    (["--case-id", "../x"], "case id"),
    (["--case-id", "first"], "already in the workspace"),
    (["--corrected-from", "p.nii.gz"], "--corrected-from"),
    (["--split", "train"], "--split train"),
])
def test_bad_worklist_additions_are_refused_and_change_nothing(tmp_path, files, args, message):
    ws = Workspace.create(tmp_path / "ws")
    ws.add_case(*files[0], case_id="first")
    before = snapshot(ws.path)
    refused = engine("add", ws.path, "--image", files[1][0], *args)
    assert refused.returncode == 2 and message in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert snapshot(ws.path) == before


def test_a_label_for_another_scan_is_refused(tmp_path, files, make_case):
    ws = Workspace.create(tmp_path / "ws")
    ws.add_to_worklist(files[1][0], case_id="w")
    before = snapshot(ws.path)
    with pytest.raises(InputError, match="not the scan w in the worklist"):
        ws.add_case(files[2][0], files[2][1], case_id="w")
    assert snapshot(ws.path) == before


def test_an_unreadable_scan_is_refused(tmp_path):
    ws = Workspace.create(tmp_path / "ws")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    before = snapshot(ws.path)
    refused = engine("add", ws.path, "--image", bad)
    assert refused.returncode == 2 and str(bad) in refused.stderr
    assert snapshot(ws.path) == before


def test_console_api_adds_to_the_worklist_then_labels_it(tmp_path):
    """``logic.addToWorklist(volumeNode)`` through the real engine and real MRML (slicer-core)."""
    import numpy as np
    import SimpleITK as sitk

    from ExtremeAugLib import mrml_bridge
    from ExtremeAugLib.headless_scene import HeadlessScene
    from ExtremeAugLib.loop_logic import LoopLogic

    headless = HeadlessScene()
    try:
        logic = LoopLogic(pythonExecutable=sys.executable, tempDirectory=tmp_path / "tmp")
        logic.setWorkspace(tmp_path / "ws")
        labels = np.zeros((8, 20, 24), np.uint8)
        labels[2:6, 4:10, 3:9] = 1
        image = sitk.GetImageFromArray((labels * 50 + 3).astype(np.float32))
        image.SetSpacing((0.8, 0.8, 3.0))
        volume = mrml_bridge.imageToVolumeNode(image, headless.scene, "Next patient")
        assert logic.addToWorklist(volume) == "Next_patient"
        assert logic.worklist() == ["Next_patient"]
        with pytest.raises(ValueError, match="already in the worklist"):
            logic.addToWorklist(volume)
        label = sitk.GetImageFromArray(labels)
        label.CopyInformation(image)
        segmentation = mrml_bridge.labelImageToSegmentation(label, volume, {1: "L1"}, nodeName="delineation")
        assert logic.addTrainingScan(volume, segmentation) == "Next_patient"  # same case id, now labelled
        assert logic.worklist() == [] and logic.caseIds() == ["Next_patient"]
    finally:
        headless.close()


def _one_labelled_two_waiting(tmp_path, pseudo_label_at) -> tuple:
    """A phantom workspace with one labelled scan and two worklist scans, and the ``--set``
    arguments of a tiny self-training that labels the worklist at ``pseudo_label_at``."""
    from ExtremeAugLogic.demo import phantom

    pairs = phantom.write_phantom_set(tmp_path / "data", 3, seed0=31, shape=(40, 40, 16), spacing=(4.0, 4.0, 4.0))
    ws = Workspace.create(tmp_path / "ws", structure_names=phantom.phantom_names("vertebrae"))
    ws.add_case(*pairs[0], case_id="labelled")
    ws.add_to_worklist(pairs[1][0], case_id="w1")
    ws.add_to_worklist(pairs[2][0], case_id="w2")
    small = {"inplane_size": 40, "patch_size": 40, "stride": 20, "base_features": 4, "depth": 3, "max_features": 16,
             "batch_size": 2, "unlabeled": "self-training", "pseudo_label_at": pseudo_label_at,
             "pseudo_label_confidence": 0.0}
    return ws, [a for k, v in small.items() for a in ("--set", f"{k}={json.dumps(v)}")]


@pytest.mark.parametrize("flag", [[], ["--no-unlabeled"]])
def test_self_training_labels_the_worklist_unless_turned_off(tmp_path, flag):
    ws, sets = _one_labelled_two_waiting(tmp_path, 0.5)
    done = engine("train", ws.path, "--iterations", 6, "--quiet", *sets, *flag)
    assert done.returncode == 0, done.stderr
    record = ws.version("v1")
    if flag:
        assert "pseudo_labels" not in record
    else:
        pseudo = record["pseudo_labels"]
        assert pseudo["used"] == ["w1", "w2"] and pseudo["at_iteration"] == 3 and set(pseudo["confidence"]) == {"w1", "w2"}
    assert record["cases_seen"] == ["labelled"] and ws.case("w1")["split"] == "worklist"  # pseudo-labels stay in memory


def test_a_second_self_training_round_labels_the_worklist_again_and_records_both(tmp_path):
    ws, sets = _one_labelled_two_waiting(tmp_path, [0.25, 0.75])
    done = engine("train", ws.path, "--iterations", 8, "--quiet", *sets)
    assert done.returncode == 0, done.stderr
    pseudo = ws.version("v1")["pseudo_labels"]
    assert pseudo["at_iteration"] == 6 and pseudo["used"] == ["w1", "w2"]  # the last round's record
    assert [r["at_iteration"] for r in pseudo["earlier"]] == [2] and pseudo["earlier"][0]["used"] == ["w1", "w2"]
    assert set(pseudo["earlier"][0]["confidence"]) == {"w1", "w2"}


@pytest.mark.parametrize("flag", [[], ["--no-unlabeled"]])
def test_consistency_training_reads_the_worklist_at_its_fraction_unless_turned_off(tmp_path, flag):
    ws, sets = _one_labelled_two_waiting(tmp_path, 0.5)
    consistency = ["--set", "unlabeled=consistency", "--set", "consistency_from=0.5", "--set", "consistency_batch=3",
                   "--set", "consistency_threshold=0.0"]
    done = engine("train", ws.path, "--iterations", 6, "--quiet", *sets, *consistency, *flag)
    assert done.returncode == 0, done.stderr
    record = ws.version("v1")
    assert "pseudo_labels" not in record  # consistency replaces self-training
    if flag:
        assert "consistency" not in record
    else:
        term = record["consistency"]
        assert term["scans"] == ["w1", "w2"] and term["from_iteration"] == 3 and term["steps"] == 3
        assert term["slices"] > 0 and term["sure_share"] == 1.0  # threshold 0: every pixel teaches
    assert record["cases_seen"] == ["labelled"] and ws.case("w1")["split"] == "worklist"


def test_the_most_confident_share_of_the_worklist_joins_self_training():
    from ExtremeAugLogic.training.trainer import confident_scans

    confidence = {"a": 0.80, "b": 0.95, "c": 0.70, "d": 0.85}
    assert confident_scans(confidence, 0.9, 0.0) == ["b"]             # the threshold alone
    assert confident_scans(confidence, 0.9, 0.5) == ["b", "d"]        # the most confident half, in worklist order
    assert confident_scans(confidence, 0.9, 0.6) == ["a", "b", "d"]   # 0.6 x 4 scans rounds up to 3
    assert confident_scans(confidence, 0.75, 0.25) == ["a", "b", "d"]  # either rule lets a scan join
    assert confident_scans(confidence, 0.99, 1.0) == ["a", "b", "c", "d"]
    assert confident_scans({}, 0.9, 0.5) == []


def test_correction_effort_counts_voxels_slices_and_structures():
    import numpy as np

    from ExtremeAugLogic.workspace.workspace import correction_effort

    prediction = np.zeros((6, 8, 10), np.uint8)
    prediction[1:4, 2:6, 2:6] = 1
    corrected = prediction.copy()
    corrected[2, 2:4, 2:6] = 2           # a level relabelled on one slice along axis 0
    corrected[:, 7, 9] = 3               # a structure added through every slice
    effort = correction_effort(prediction, corrected, slice_axis=0)
    assert effort == {"changed_voxels": 8 + 6, "slices_touched": 6, "structures_changed": [1, 2, 3]}
    assert correction_effort(prediction, corrected, slice_axis=2)["slices_touched"] == 5  # columns 2..5 and 9


def test_worklist_predictions_wait_go_stale_and_record_the_correction(tmp_path):
    """predict --worklist writes each prediction with its model's record; a new best makes them stale;
    labelling the scan measures the correction against the waiting prediction."""
    import numpy as np
    import SimpleITK as sitk

    from ExtremeAugLogic.demo import phantom
    from ExtremeAugLogic.workspace.imageio import read_label

    pairs = phantom.write_phantom_set(tmp_path / "data", 3, seed0=51, shape=(40, 40, 16), spacing=(4.0, 4.0, 4.0))
    ws = Workspace.create(tmp_path / "ws", structure_names=phantom.phantom_names("vertebrae"))
    ws.add_case(*pairs[0], case_id="first")
    ws.add_to_worklist(pairs[1][0], case_id="w1")
    ws.add_to_worklist(pairs[2][0], case_id="w2")
    small = {"inplane_size": 40, "patch_size": 40, "stride": 20, "base_features": 4, "depth": 3, "max_features": 16,
             "batch_size": 2}
    sets = [a for k, v in small.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    assert engine("train", ws.path, "--iterations", 3, "--quiet", "--no-predict-worklist", *sets).returncode == 0
    assert [r["state"] for r in ws.worklist_state()] == ["none", "none"]
    made = engine("predict", ws.path, "--worklist")
    assert made.returncode == 0 and "2 prediction(s) made" in made.stdout, made.stderr
    rows = ws.worklist_state()
    assert [r["state"] for r in rows] == ["ready", "ready"] and all(0.0 <= r["uncertainty"] <= 1.0 for r in rows)
    by_uncertainty = ws.worklist_state("uncertainty")
    assert [r["uncertainty"] for r in by_uncertainty] == sorted([r["uncertainty"] for r in rows], reverse=True)
    again = engine("predict", ws.path, "--worklist")
    assert "0 prediction(s) made, 2 already up to date" in again.stdout
    # a killed prediction: label written, record not yet: it is made again
    ws.worklist_prediction_files("w2")[1].unlink()
    assert [r["state"] for r in ws.worklist_state()] == ["ready", "none"]
    # a new best model: both stale; train predicts them again at its end
    retrained = engine("train", ws.path, "--iterations", 3, "--quiet", "--init-from", "best", *sets)
    assert retrained.returncode == 0 and "predicted 2 worklist scan(s)" in retrained.stdout, retrained.stderr
    assert {r["version"] for r in ws.worklist_state()} == {ws.best_version()}
    shown = engine("status", ws.path)
    assert "worklist w1: prediction ready by v2" in shown.stdout
    # the clinician corrects w1: the effort is measured against the waiting prediction
    waiting = sitk.GetArrayFromImage(read_label(ws.worklist_prediction_files("w1")[0], allow_empty=True))
    truth = sitk.GetArrayFromImage(read_label(pairs[1][1]))
    case = ws.add_case(pairs[1][0], pairs[1][1], case_id="w1")
    assert case["predicted_by"] == "v2" and case["changed_voxels"] == int(np.count_nonzero(waiting != truth))
    assert case["status"] == "corrected" and not ws.worklist_prediction_files("w1")[0].exists()


def test_console_next_scan_loads_the_waiting_prediction(tmp_path):
    """``logic.nextScan()`` / ``loadNextScan(scene)``: the scan and its waiting prediction, ready to correct."""
    from ExtremeAugLogic.demo import phantom
    from ExtremeAugLib.headless_scene import HeadlessScene
    from ExtremeAugLib.loop_logic import LoopLogic

    pairs = phantom.write_phantom_set(tmp_path / "data", 2, seed0=61, shape=(40, 40, 16), spacing=(4.0, 4.0, 4.0))
    ws = Workspace.create(tmp_path / "ws", structure_names=phantom.phantom_names("vertebrae"))
    ws.add_case(*pairs[0], case_id="first")
    ws.add_to_worklist(pairs[1][0], case_id="next_one")
    small = {"inplane_size": 40, "patch_size": 40, "stride": 20, "base_features": 4, "depth": 3, "max_features": 16,
             "batch_size": 2}
    sets = [a for k, v in small.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    assert engine("train", ws.path, "--iterations", 2, "--quiet", *sets).returncode == 0  # predicts the worklist too
    headless = HeadlessScene()
    try:
        logic = LoopLogic(pythonExecutable=sys.executable, tempDirectory=tmp_path / "tmp")
        logic.setWorkspace(ws.path)
        row = logic.nextScan()
        assert row["id"] == "next_one" and row["state"] == "ready" and row["version"] == "v1"
        assert logic.actionBlockers(None, None)["next"] is None
        volume, segmentation = logic.loadNextScan(headless.scene)
        assert volume.GetName() == "next_one" and segmentation is not None
        assert segmentation.GetAttribute("ExtremeAug.ModelVersion") == "v1"
        case_id, changed = logic.acceptCorrection(volume, segmentation)  # accepted unedited: nothing changed
        assert case_id == "next_one" and changed == 0
        assert ws.case("next_one")["split"] != "worklist" and ws.case("next_one")["predicted_by"] == "v1"
        assert logic.actionBlockers(None, None)["next"] == "The worklist is empty."
    finally:
        headless.close()
