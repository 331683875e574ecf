"""The workspace: cases, fixed validation split, versions, nnU-Net layout, crash safety."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ExtremeAugLogic.workspace import atomic
from ExtremeAugLogic.errors import InputError
from ExtremeAugLogic.workspace import (NO_VALIDATION_REASON, Workspace, auto_split,
                                       case_id_from_filename)

REPO_ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- helpers

def snapshot(folder: Path) -> dict:
    """Every file (hidden ones too) and folder under ``folder`` with its bytes."""
    state = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        state[rel] = p.read_bytes() if p.is_file() else "<dir>"
    return state


def write_case(folder: Path, name: str, make_case, **kwargs):
    """Write a synthetic scan and label as ``<name>_0000.nii.gz`` / ``<name>_label.nii.gz``."""
    folder.mkdir(parents=True, exist_ok=True)
    scan, label = make_case(**kwargs)
    image_path, label_path = folder / f"{name}_0000.nii.gz", folder / f"{name}_label.nii.gz"
    sitk.WriteImage(scan, str(image_path))
    sitk.WriteImage(label, str(label_path))
    return image_path, label_path


@pytest.fixture
def ws(tmp_path):
    return Workspace.create(tmp_path / "ws")


@pytest.fixture
def ws_one(ws, tmp_path, make_case):
    """A workspace holding one case ``first``."""
    image, label = write_case(tmp_path / "in", "first", make_case)
    ws.add_case(image, label)
    return ws


# ---------------------------------------------------------------- create / open

def test_create_layout_and_reopen(tmp_path):
    ws = Workspace.create(tmp_path / "new" / "ws", modality="CT")
    for sub in ("imagesTr", "labelsTr", "predictions", "models"):
        assert (ws.path / sub).is_dir()
    manifest = json.loads((ws.path / "extremeaug.json").read_text())
    assert manifest["format_version"] == 1 and manifest["cases"] == [] and manifest["best_version"] is None
    assert manifest["created_at"].endswith("+00:00")
    again = Workspace.create(ws.path)  # already a workspace: just opens it
    assert again.modality == "CT"
    assert Workspace.open(ws.path).cases() == []
    assert ws.status_path == ws.path / "status.json"
    assert ws.lock_path == ws.path / "train.lock"


def test_open_non_workspace_folder(tmp_path):
    folder = tmp_path / "stuff"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    before = snapshot(folder)
    with pytest.raises(InputError) as exc:
        Workspace.open(folder)
    assert str(exc.value) == (f"{folder}: not an ExtremeAug workspace (no extremeaug.json); "
                              f"run 'python -m ExtremeAugLogic init {folder}' first")
    with pytest.raises(InputError) as exc:
        Workspace.create(folder)
    assert str(exc.value).startswith(str(folder))
    assert snapshot(folder) == before


def test_create_on_a_file(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("x")
    with pytest.raises(InputError, match="is a file"):
        Workspace.create(path)


# ---------------------------------------------------------------- adding cases

def test_add_case_nnunet_layout_and_dataset_json(ws, tmp_path, make_case):
    image, label = write_case(tmp_path / "in", "spine_07", make_case)
    entry = ws.add_case(image, label, structure_names={1: "L1"})
    assert entry["id"] == "spine_07"
    assert entry["image"] == "imagesTr/spine_07_0000.nii.gz"
    assert entry["label"] == "labelsTr/spine_07.nii.gz"
    assert entry["prediction"] is None and entry["changed_voxels"] is None
    assert entry["status"] == "delineated" and entry["split"] == "train" and entry["order"] == 1
    assert entry["source_image"] == str(image.resolve()) and entry["source_label"] == str(label.resolve())
    assert (ws.path / entry["image"]).is_file() and (ws.path / entry["label"]).is_file()

    dataset = json.loads((ws.path / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "MRI"}
    assert dataset["labels"] == {"background": 0, "L1": 1, "structure_2": 2}
    assert dataset["numTraining"] == 1 and dataset["file_ending"] == ".nii.gz"
    assert ws.structure_names() == {1: "L1", 2: "structure_2"}

    scan, lab = ws.load_case("spine_07")
    assert scan.GetPixelID() == sitk.sitkFloat32 and lab.GetPixelID() == sitk.sitkUInt8
    _, original = make_case()
    assert np.array_equal(sitk.GetArrayFromImage(lab), sitk.GetArrayFromImage(original))
    assert scan.GetOrigin() == pytest.approx((-10.0, 5.0, 3.0))


def test_in_memory_images_and_default_ids(ws, make_case):
    scan, label = make_case()
    assert ws.add_case(scan, label)["id"] == "case_001"
    assert ws.add_case(scan, label, source_image="/data/Patient 5_image.nrrd")["id"] == "Patient_5"
    # derived id already taken -> case_NNN
    assert ws.add_case(scan, label, source_image="/data/patient_5.nrrd")["id"] == "case_003"
    assert case_id_from_filename("/x/spine_03_0000.nii.gz") == "spine_03"
    assert case_id_from_filename("/x/..nii.gz") is None


def test_structures_extend_and_rename(ws, make_case):
    scan, label = make_case(values=(1,))
    ws.add_case(scan, label, case_id="a")
    scan, label = make_case(values=(1, 2, 3))
    ws.add_case(scan, label, case_id="b")
    assert ws.structure_names() == {1: "structure_1", 2: "structure_2", 3: "structure_3"}
    ws.set_structure_names({2: "L2", "3": "L3"})
    assert Workspace.open(ws.path).structure_names() == {1: "structure_1", 2: "L2", 3: "L3"}
    labels = json.loads(ws.dataset_json_path.read_text())["labels"]
    assert labels == {"background": 0, "structure_1": 1, "L2": 2, "L3": 3}
    with pytest.raises(InputError, match="L2"):
        ws.set_structure_names({1: "L2"})
    with pytest.raises(InputError, match="background"):
        ws.set_structure_names({1: "background"})


def test_corrected_case_keeps_prediction_and_counts_changes(ws_one, make_case):
    scan, label = make_case(seed=3)
    pred = sitk.GetArrayFromImage(label).copy()
    pred[0, 0, :5] = 1          # 5 false-positive voxels
    pred[pred == 2] = 0         # a whole missed structure
    missed = int(np.count_nonzero(sitk.GetArrayFromImage(label) == 2))
    pred_img = sitk.GetImageFromArray(pred)
    pred_img.CopyInformation(label)
    entry = ws_one.add_case(scan, label, case_id="c2", corrected_from=pred_img)
    assert entry["status"] == "corrected"
    assert entry["prediction"] == "predictions/c2.nii.gz"
    assert entry["changed_voxels"] == 5 + missed
    kept = ws_one.load_prediction("c2")
    assert np.array_equal(sitk.GetArrayFromImage(kept), pred)
    assert ws_one.case("c2")["changed_voxels"] == 5 + missed


def test_empty_prediction_is_allowed(ws, make_case):
    scan, label = make_case()
    empty = sitk.Image(label.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(label)
    entry = ws.add_case(scan, label, corrected_from=empty)
    assert entry["changed_voxels"] == int(np.count_nonzero(sitk.GetArrayFromImage(label)))


def test_two_handles_see_each_others_changes(ws, make_case):
    other = Workspace.open(ws.path)
    scan, label = make_case()
    ws.add_case(scan, label, case_id="a")
    entry = other.add_case(scan, label, case_id="b")  # re-reads the manifest first
    assert entry["order"] == 2
    assert ws.case_ids() == ["a", "b"]
    with pytest.raises(InputError, match="already"):
        other.add_case(scan, label, case_id="A")  # ids are unique regardless of case


def test_load_cases(ws, make_case):
    for i in range(3):
        scan, label = make_case(seed=i)
        ws.add_case(scan, label, case_id=f"c{i + 1}")
    train = ws.load_cases("train")
    assert [c.case_id for c in train] == ["c1", "c2"]
    assert [c.case_id for c in ws.load_cases("validation")] == ["c3"]
    assert train[0].image.GetSize() == train[0].label.GetSize() == (16, 16, 8)


# ---------------------------------------------------------------- validation split

def test_fixed_validation_split(ws, make_case):
    assert "no validation case yet (need 3 cases" in ws.validation_note()
    history = []
    scan, label = make_case()
    for n in range(1, 14):
        ws.add_case(scan, label, case_id=f"c{n:02d}")
        splits = [c["split"] for c in Workspace.open(ws.path).cases()]
        for earlier in history:
            assert splits[: len(earlier)] == earlier  # earlier decisions never change
        history.append(splits)
    final = history[-1]
    validation = [i + 1 for i, s in enumerate(final) if s == "validation"]
    assert validation == [3, 8, 13]
    assert [c["id"] for c in ws.validation_cases()] == ["c03", "c08", "c13"]
    assert len(ws.training_cases()) == 10
    assert "c03" in ws.validation_note()


def test_forced_split_and_auto_rule(ws, make_case):
    scan, label = make_case()
    ws.add_case(scan, label, case_id="a", split="validation")
    ws.add_case(scan, label, case_id="b")
    ws.add_case(scan, label, case_id="c")  # one validation already: train
    assert [c["split"] for c in ws.cases()] == ["validation", "train", "train"]
    assert auto_split(3, 0) == "validation" and auto_split(4, 1) == "train"
    assert auto_split(2, 0) == "train" and auto_split(8, 1) == "validation"


def test_note_when_all_cases_forced_to_train(ws, make_case):
    scan, label = make_case()
    for n in range(3):
        ws.add_case(scan, label, case_id=f"t{n}", split="train")
    assert ws.validation_cases() == []
    assert "not shown as validation" in ws.validation_note()


# ---------------------------------------------------------------- bad inputs change nothing

def _bad_inputs(tmp_path: Path, make_case):
    """name -> (kwargs for add_case, text the message must contain)."""
    d = tmp_path / "bad"
    good_image, good_label = write_case(d, "good", make_case)
    cases = {}
    cases["missing image"] = (dict(image=d / "nope.nii.gz", label=good_label), d / "nope.nii.gz")
    cases["missing label"] = (dict(image=good_image, label=d / "nolab.nii.gz"), d / "nolab.nii.gz")
    garbage = d / "garbage.nii.gz"
    garbage.write_bytes(os.urandom(2000))
    cases["unreadable image"] = (dict(image=garbage, label=good_label), garbage)
    cases["unreadable label"] = (dict(image=good_image, label=garbage), garbage)

    _, other_label = write_case(d, "other", make_case, size=(16, 16, 9))
    cases["label grid differs"] = (dict(image=good_image, label=other_label), other_label)
    _, spaced_label = write_case(d, "spaced", make_case, spacing=(1.0, 1.0, 3.0))
    cases["label spacing differs"] = (dict(image=good_image, label=spaced_label), "spacing")
    cases["prediction grid differs"] = (
        dict(image=good_image, label=good_label, corrected_from=other_label), other_label)

    empty = d / "empty.nii.gz"
    sitk.WriteImage(sitk.Image([16, 16, 8], sitk.sitkUInt8), str(empty))
    cases["empty label"] = (dict(image=good_image, label=empty), empty)

    flat = d / "flat.nii.gz"
    sitk.WriteImage(sitk.Image([16, 16], sitk.sitkFloat32), str(flat))
    cases["2D image"] = (dict(image=flat, label=good_label), flat)

    four = d / "four.nii.gz"
    vol = sitk.Image([16, 16, 8], sitk.sitkFloat32)
    sitk.WriteImage(sitk.JoinSeries([vol, vol]), str(four))
    cases["4D image"] = (dict(image=four, label=good_label), four)

    nan_array = np.zeros((8, 16, 16), np.float32)
    nan_array[2, 3, 4] = np.nan
    nan_img = sitk.GetImageFromArray(nan_array)
    nan_img.CopyInformation(sitk.ReadImage(str(good_image)))
    nan_path = d / "nan.nrrd"
    sitk.WriteImage(nan_img, str(nan_path))
    cases["NaN intensities"] = (dict(image=nan_path, label=good_label), nan_path)

    frac = sitk.Cast(sitk.ReadImage(str(good_label)), sitk.sitkFloat32) * 0.5
    frac_path = d / "frac.nrrd"
    sitk.WriteImage(frac, str(frac_path))
    cases["non-integer label"] = (dict(image=good_image, label=frac_path), frac_path)

    for bad_id in BAD_IDS:
        cases[f"case id {bad_id!r}"] = (dict(image=good_image, label=good_label, case_id=bad_id), bad_id)
    cases["duplicate id"] = (dict(image=good_image, label=good_label, case_id="first"), "first")
    cases["duplicate id other case"] = (dict(image=good_image, label=good_label, case_id="FIRST"), "FIRST")
    cases["bad split"] = (dict(image=good_image, label=good_label, split="test"), "test")
    cases["bad structure name"] = (
        dict(image=good_image, label=good_label, structure_names={1: ""}), "1")
    return cases


BAD_IDS = ["a/b", "../evil", "a\\b", "..", ".hidden", "", "x" * 65, "with space"]
BAD_NAMES = (["missing image", "missing label", "unreadable image", "unreadable label",
              "label grid differs", "label spacing differs", "prediction grid differs", "empty label",
              "2D image", "4D image", "NaN intensities", "non-integer label"]
             + [f"case id {bad_id!r}" for bad_id in BAD_IDS]
             + ["duplicate id", "duplicate id other case", "bad split", "bad structure name"])


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_input_changes_nothing(ws_one, tmp_path, make_case, name):
    cases = _bad_inputs(tmp_path, make_case)
    assert set(cases) == set(BAD_NAMES)
    kwargs, must_mention = cases[name]
    before = snapshot(ws_one.path)
    with pytest.raises(InputError) as exc:
        ws_one.add_case(**kwargs)
    message = str(exc.value)
    assert "\n" not in message
    assert str(must_mention) in message, message
    assert snapshot(ws_one.path) == before


# ---------------------------------------------------------------- model versions

def test_versions_and_best_marking(ws):
    v1 = ws.new_version({"level": 8}, ["a"])
    assert v1 == "v1" and (ws.path / "models" / "v1" / "version.json").is_file()
    record = ws.version("v1")
    assert record["status"] == "training" and record["iterations"] == 0 and record["val_scores"] is None
    assert record["settings"] == {"level": 8} and record["cases_seen"] == ["a"] and record["parent"] is None

    ws.update_version("v1", iterations=500)
    assert Workspace.open(ws.path).version("v1")["iterations"] == 500

    assert ws.finish_version("v1", None) is True                    # first model
    assert ws.version("v1")["best_reason"] == NO_VALIDATION_REASON
    v2 = ws.new_version({}, ["a", "b"], parent="v1")
    assert ws.finish_version(v2, None) is True                      # newest without validation
    assert ws.best_version() == "v2"
    assert ws.version("v2")["best_reason"] == NO_VALIDATION_REASON

    v3 = ws.new_version({}, ["a", "b"], parent="v2")
    assert ws.finish_version(v3, {"mean_dice": 0.5}) is True        # validated beats unvalidated
    v4 = ws.new_version({}, ["a", "b"])
    assert ws.finish_version(v4, {"mean_dice": 0.4}) is False
    assert ws.version("v4")["best_reason"] is None
    v5 = ws.new_version({}, ["a", "b"])
    assert ws.finish_version(v5, None, status="stopped") is False  # unvalidated loses to validated
    v6 = ws.new_version({}, ["a", "b"])
    assert ws.finish_version(v6, {"mean_dice": 0.6}, status="failed") is False
    v7 = ws.new_version({}, ["a", "b"])
    assert ws.finish_version(v7, {"mean_dice": 0.7}) is True
    assert ws.best_version() == "v7" and ws.version("v7")["status"] == "done"
    assert [v["name"] for v in ws.versions()] == [f"v{i}" for i in range(1, 8)]
    on_disk = json.loads((ws.model_dir("v7") / "version.json").read_text())
    assert on_disk["val_scores"] == {"mean_dice": 0.7}

    with pytest.raises(InputError, match="v99"):
        ws.new_version({}, [], parent="v99")
    with pytest.raises(InputError, match="v99"):
        ws.version("v99")


def test_leftover_model_folder_is_not_reused(ws):
    (ws.models_dir / "v4").mkdir()
    assert ws.new_version({}, []) == "v5"


# ---------------------------------------------------------------- crash safety

def test_manifest_writer_raising_leaves_old_manifest(ws_one, monkeypatch):
    ws_one.set_structure_names({1: "L1"})
    before = snapshot(ws_one.path)

    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith("extremeaug.json"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        ws_one.set_structure_names({1: "renamed"})
    monkeypatch.undo()
    assert snapshot(ws_one.path) == before  # temp file removed, manifest untouched
    assert Workspace.open(ws_one.path).structure_names()[1] == "L1"


def test_unserialisable_update_leaves_old_manifest(ws_one):
    ws_one.new_version({}, ["first"])
    before = snapshot(ws_one.path)
    with pytest.raises(TypeError):
        ws_one.update_version("v1", settings=object())
    assert snapshot(ws_one.path) == before


def _run_child(code: str, **kwargs) -> subprocess.Popen:
    script = textwrap.dedent(code)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_crash_before_manifest_rename_keeps_old_manifest_and_retry_works(ws_one, tmp_path, make_case):
    image, label = write_case(tmp_path / "in2", "second", make_case, seed=1)
    manifest_before = ws_one.manifest_path.read_bytes()
    child = _run_child(f"""
        import os
        from ExtremeAugLogic.workspace import Workspace
        real = os.replace
        def dying(src, dst):
            if str(dst).endswith("extremeaug.json"):
                os._exit(3)   # the process dies just before the manifest rename
            return real(src, dst)
        os.replace = dying
        Workspace.open({str(ws_one.path)!r}).add_case({str(image)!r}, {str(label)!r})
    """)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 3, err
    assert ws_one.manifest_path.read_bytes() == manifest_before
    assert Workspace.open(ws_one.path).case_ids() == ["first"]
    # the stray image files are harmless: retrying overwrites them
    assert ws_one.add_case(image, label)["id"] == "second"
    assert Workspace.open(ws_one.path).case_ids() == ["first", "second"]


def test_sigkill_during_manifest_rewrites_leaves_valid_manifest(ws_one):
    ws_one.new_version({}, ["first"])
    child = _run_child(f"""
        from ExtremeAugLogic.workspace import Workspace
        ws = Workspace.open({str(ws_one.path)!r})
        padding = "x" * 2_000_000   # a large manifest makes each write take a while
        i = 1
        ws.update_version("v1", iterations=i, padding=padding)
        print("ready", flush=True)
        while True:
            i += 1
            ws.update_version("v1", iterations=i, padding=padding)
    """)
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        time.sleep(0.4)
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    reopened = Workspace.open(ws_one.path)
    record = reopened.version("v1")
    assert record["iterations"] >= 1 and len(record["padding"]) == 2_000_000
    assert reopened.case_ids() == ["first"]
    # the lock died with the child: further changes work and drop the padding
    reopened.update_version("v1", padding=None)
    assert Workspace.open(ws_one.path).version("v1")["padding"] is None


def test_sigkill_with_torn_temp_manifest_keeps_old_one(ws_one):
    manifest_before = ws_one.manifest_path.read_bytes()
    child = _run_child(f"""
        import os, time
        from ExtremeAugLogic.workspace import atomic
        from ExtremeAugLogic.workspace import Workspace
        def torn(path):
            if "extremeaug" in path.name:
                with open(path, "r+b") as handle:   # half-written temp manifest
                    handle.truncate(os.path.getsize(path) // 2)
                print("torn", flush=True)
                time.sleep(60)
        atomic._fsync_file = torn
        Workspace.open({str(ws_one.path)!r}).set_structure_names({{1: "L1"}})
    """)
    try:
        assert child.stdout.readline().strip() == "torn", child.stderr.read()
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=30)
    leftovers = [p.name for p in ws_one.path.glob(".extremeaug.*")]
    assert len(leftovers) == 1  # the torn temp file is still there ...
    assert ws_one.manifest_path.read_bytes() == manifest_before  # ... but never replaced the manifest
    reopened = Workspace.open(ws_one.path)
    assert reopened.case_ids() == ["first"]
    reopened.set_structure_names({1: "L1"})  # lock released by the kill; retry works
    assert Workspace.open(ws_one.path).structure_names()[1] == "L1"


def test_atomic_write_json_leaves_no_temp_on_error(tmp_path):
    target = tmp_path / "x.json"
    atomic.write_json(target, {"a": 1})
    with pytest.raises(TypeError):
        atomic.write_json(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
