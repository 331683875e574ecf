"""A shared workspace is untrusted: manifest, config.json and version.json checks refuse escapes."""

import copy
import json
import math
import os

import pytest

from ExtremeAugLogic import contract
from ExtremeAugLogic.errors import InputError
from ExtremeAugLogic.manifest_check import (check_manifest, check_version_config, check_version_record,
                                            contained)

MANIFEST = "/data/ws/extremeaug.json"


# ---------------------------------------------------------------- dicts as workspace.py writes them

def case_entry(case_id, order, split="train", corrected=False):
    return {
        "id": case_id,
        "status": "corrected" if corrected else "delineated",
        "split": split,
        "image": f"imagesTr/{case_id}_0000.nii.gz",
        "label": f"labelsTr/{case_id}.nii.gz",
        "prediction": f"predictions/{case_id}.nii.gz" if corrected else None,
        "source_image": f"/home/someone/scans/{case_id}_0000.nii.gz",
        "source_label": None,
        "added_at": "2026-05-09T07:35:25+00:00",
        "changed_voxels": 12 if corrected else None,
        "order": order,
    }


def version_entry(name, parent=None, status="done"):
    record = {
        "name": name,
        "created_at": "2026-05-09T08:00:00+00:00",
        "settings": {"intensity": "match", "offline_dir": None, "learning_rate": 0.002,
                     "model": "2d", "device": "cpu", "budget_iterations": None, "budget_minutes": 5.0},
        "cases_seen": ["spine_01", "spine_02"],
        "parent": parent,
        "status": status,
        "val_scores": None,
        "iterations": 120,
    }
    if status == "done":
        record.update(seconds=61.5, finished_at="2026-05-09T08:05:00+00:00",
                      best_reason="no validation cases: newest model used",
                      comparison="no validation cases: newest model used",
                      val_scores={"mean_dice": 0.8, "binary_dice": 0.9, "per_case": {}, "cases": []})
    return record


def valid_manifest():
    return {
        "format_version": 1,
        "created_at": "2026-05-09T07:30:00+00:00",
        "modality": "MRI",
        "structures": {"1": "L1", "2": "L2"},
        "cases": [case_entry("spine_01", 1), case_entry("spine_02", 2, corrected=True),
                  case_entry("spine_03", 3, split="validation")],
        "versions": [version_entry("v1"), version_entry("v2", parent="v1")],
        "best_version": "v2",
    }


def refused(check, *args, names=()):
    """The one-line InputError message of ``check(*args)``; it must name each of ``names``."""
    with pytest.raises(InputError) as info:
        check(*args)
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert name in message, message
    return message


def refused_manifest(manifest, field):
    message = refused(check_manifest, manifest, MANIFEST, names=(MANIFEST,))
    assert message.startswith(f"{MANIFEST}: {field}: "), message
    return message


# ---------------------------------------------------------------- manifest

def test_valid_manifest_is_returned_unchanged():
    manifest = valid_manifest()
    before = copy.deepcopy(manifest)
    assert check_manifest(manifest, MANIFEST) == before
    assert manifest == before


def test_older_manifest_without_defaulted_keys_and_unknown_fields_passes():
    manifest = {"cases": [case_entry("a", 1)], "versions": []}
    manifest["cases"][0]["note"] = "kept for a newer ExtremeAug"
    assert check_manifest(manifest, MANIFEST) is manifest


def test_unlabelled_worklist_case_is_accepted_but_its_image_is_checked():
    manifest = valid_manifest()
    scan = case_entry("scan_04", 4, split="worklist")
    scan.update(label=None, status="unlabelled")
    manifest["cases"].append(scan)
    check_manifest(manifest, MANIFEST)
    scan["image"] = "../x_0000.nii.gz"
    refused_manifest(manifest, "cases[3].image")


@pytest.mark.parametrize("field", ["image", "label", "prediction"])
@pytest.mark.parametrize("value", ["../x", "/etc/passwd", "imagesTr/../../x", "imagesTr\\spine_02_0000.nii.gz",
                                   "~/x.nii.gz", "C:/x.nii.gz", "", "labelsTr//spine_02.nii.gz"])
def test_case_path_escape_is_refused(field, value):
    manifest = valid_manifest()
    manifest["cases"][1][field] = value
    refused_manifest(manifest, f"cases[1].{field}")


@pytest.mark.parametrize("field, value", [
    ("image", "labelsTr/spine_02_0000.nii.gz"),        # wrong folder
    ("image", "imagesTr/spine_01_0000.nii.gz"),        # another case's file
    ("label", "labelsTr/spine_02.nii"),                # wrong ending
    ("prediction", "imagesTr/spine_02.nii.gz"),
])
def test_case_path_in_wrong_place_is_refused(field, value):
    manifest = valid_manifest()
    manifest["cases"][1][field] = value
    message = refused_manifest(manifest, f"cases[1].{field}")
    assert "must be" in message


def test_unknown_path_field_of_a_case_is_accepted_inside():
    manifest = valid_manifest()
    manifest["cases"][0]["worklist_path"] = "predictions/worklist/spine_01.nii.gz"
    check_manifest(manifest, MANIFEST)


@pytest.mark.parametrize("value, reason", [
    ("../../elsewhere.nii.gz", "'..'"), ("predictions/../../x", "'..'"), ("/etc/passwd", "absolute"),
    ("~/x", "'~'"), ("C:/x", "drive"), ("predictions\\x", "backslash"), ("./x", "'.' parts"),
    (3, "relative path"),
])
def test_unknown_path_field_of_a_case_is_refused_outside(value, reason):
    manifest = valid_manifest()
    manifest["cases"][0]["worklist_path"] = value
    assert reason in refused_manifest(manifest, "cases[0].worklist_path")


@pytest.mark.parametrize("case_id", ["..", "a..b", "../spine", "a/b", ".hidden", ""])
def test_unsafe_case_id_is_refused(case_id):
    manifest = valid_manifest()
    manifest["cases"][0]["id"] = case_id
    refused_manifest(manifest, "cases[0].id")


def test_case_ids_must_differ_ignoring_case():
    manifest = valid_manifest()
    manifest["cases"][2] = case_entry("SPINE_01", 3, split="validation")
    refused_manifest(manifest, "cases[2].id")


@pytest.mark.parametrize("split", ["test", None, "../train"])
def test_unknown_split_is_refused(split):
    manifest = valid_manifest()
    manifest["cases"][0]["split"] = split
    refused_manifest(manifest, "cases[0].split")


@pytest.mark.parametrize("name", ["..", "v1/../..", "a/b", "../../escaped-model", "v..1"])
def test_unsafe_version_name_is_refused(name):
    manifest = valid_manifest()
    manifest["versions"][1]["name"] = name
    manifest["best_version"] = "v1"
    refused_manifest(manifest, "versions[1].name")


def test_version_names_must_be_unique():
    manifest = valid_manifest()
    manifest["versions"][1]["name"] = "V1"
    manifest["best_version"] = "v1"
    refused_manifest(manifest, "versions[1].name")


def test_best_version_must_exist():
    manifest = valid_manifest()
    manifest["best_version"] = "v9"
    refused_manifest(manifest, "best_version")


def test_best_version_path_escape_is_refused():
    manifest = valid_manifest()
    manifest["best_version"] = "../../escaped-model"
    assert "path separator" in refused_manifest(manifest, "best_version")


def test_parent_must_exist():
    manifest = valid_manifest()
    manifest["versions"][1]["parent"] = "v7"
    refused_manifest(manifest, "versions[1].parent")


def test_parent_loop_is_refused():
    manifest = valid_manifest()
    manifest["versions"] = [version_entry("v1"), version_entry("v2", parent="v3"),
                            version_entry("v3", parent="v2")]
    message = refused_manifest(manifest, "versions[1].parent")
    assert "v2 -> v3 -> v2" in message


def test_self_parent_is_refused():
    manifest = valid_manifest()
    manifest["versions"][1]["parent"] = "v2"
    assert "own parent" in refused_manifest(manifest, "versions[1].parent")


@pytest.mark.parametrize("status", ["hacked", None, "DONE"])
def test_unknown_version_status_is_refused(status):
    manifest = valid_manifest()
    manifest["versions"][0]["status"] = status
    refused_manifest(manifest, "versions[0].status")


def test_every_contract_version_status_is_accepted():
    manifest = valid_manifest()
    for status in contract.VERSION_STATUSES:
        manifest["versions"][0]["status"] = status
        check_manifest(manifest, MANIFEST)


@pytest.mark.parametrize("field, value", [
    ("cases", {"spine_01": {}}), ("versions", "v1"), ("structures", ["L1"]), ("best_version", 2),
])
def test_wrong_top_level_type_is_refused(field, value):
    manifest = valid_manifest()
    manifest[field] = value
    refused_manifest(manifest, field)


@pytest.mark.parametrize("structures, field", [
    ({"one": "L1"}, "structures['one']"), ({"0": "L1"}, "structures['0']"), ({"1": ""}, "structures[1]"),
])
def test_bad_structures_are_refused(structures, field):
    manifest = valid_manifest()
    manifest["structures"] = structures
    refused_manifest(manifest, field)


def test_manifest_written_by_a_real_workspace_passes(tmp_path, make_case):
    from ExtremeAugLogic.workspace import Workspace

    ws = Workspace.create(tmp_path / "ws", structure_names={1: "L1", 2: "L2"})
    for n in range(3):
        scan, label = make_case(seed=n)
        ws.add_case(scan, label, case_id=f"spine_{n:02d}", corrected_from=label if n == 1 else None)
    first = ws.new_version({"level": 50, "offline_dir": None}, ws.case_ids("train"))
    ws.update_version(first, iterations=10, seconds=1.5)
    ws.finish_version(first, {"mean_dice": 0.5, "binary_dice": 0.6, "per_case": {}, "cases": []})
    second = ws.new_version({"level": 50}, ws.case_ids("train"), parent=first)
    ws.update_version(second, status="stopped")

    manifest = ws.manifest()
    assert [c["split"] for c in manifest["cases"]] == ["train", "train", "validation"]
    assert manifest["cases"][1]["prediction"] is not None
    assert check_manifest(manifest, ws.manifest_path) == ws.manifest()
    for record in manifest["versions"]:
        folder = ws.model_dir(record["name"])
        mirror = json.loads((folder / contract.VERSION_RECORD_NAME).read_text())
        assert check_version_record(mirror, folder / contract.VERSION_RECORD_NAME, record) == record
    for case in manifest["cases"]:
        for field in ("image", "label"):
            assert contained(ws.path, case[field]) == (ws.path / case[field]).resolve()


# ---------------------------------------------------------------- config.json

def config_2d(**settings):
    return {"kind": "2d", "num_classes": 3,
            "settings": {"intensity": "match", "patch_size": 128, "scale": [0.8, 1.2], "offline_dir": None,
                         "learning_rate": 0.002, "device": "cpu", "preset": "default", **settings},
            "template": [0.0, 0.1, 0.5, 1.0], "template_case": "spine_01"}


def config_3d():
    return {
        "spacing": [2.0, 1.0, 1.0], "median_shape": [8, 16, 16], "num_classes": 3,
        "axis_depths": [0, 1, 1], "depth": 2, "through_plane_axis": 0,
        "strides": [[1, 1, 1], [1, 2, 2], [1, 1, 1]], "kernels": [[1, 3, 3], [1, 3, 3], [1, 1, 1]],
        "filters": [6, 12, 24], "patch_size_full": [8, 16, 16], "patch_size": [8, 16, 16],
        "batch_size": 2, "device_type": "cpu", "memory_budget_mb": 1024.0, "estimated_memory_mb": 12.5,
        "kind": "3d", "settings": {"intensity": "zscore", "device": "cpu", "scale": [0.85, 1.25],
                                   "memory_budget_mb": None, "patch_size": None},
        "intensity": "zscore", "deep_supervision": True, "ds_weights": [2 / 3, 1 / 3],
    }


@pytest.fixture
def config_path(tmp_path):
    folder = tmp_path / "ws" / "models" / "v1"
    folder.mkdir(parents=True)
    return folder / "config.json"


@pytest.mark.parametrize("make", [config_2d, config_3d])
def test_valid_configs_are_returned_unchanged(make, config_path):
    config = make()
    assert check_version_config(config, config_path) == make()


def test_offline_dir_outside_the_workspace_is_refused(tmp_path, config_path):
    outside = tmp_path / "elsewhere"
    message = refused(check_version_config, config_2d(offline_dir=str(outside)), config_path,
                      names=(str(config_path), "settings.offline_dir"))
    assert message.startswith(f"{config_path}: settings.offline_dir: ")


def test_offline_dir_escaping_with_dots_is_refused(config_path):
    sneaky = str(config_path.parent.parent.parent / ".." / "elsewhere")
    refused(check_version_config, config_2d(offline_dir=sneaky), config_path, names=("settings.offline_dir",))


def test_offline_dir_inside_the_workspace_is_accepted(config_path):
    inside = config_path.parent.parent.parent / "offline" / "folds"
    check_version_config(config_2d(offline_dir=str(inside)), config_path)


def test_offline_dir_given_on_the_command_line_is_accepted(tmp_path, config_path):
    given = tmp_path / "offline"
    config = config_2d(offline_dir=str(given / "folds"))
    assert check_version_config(config, config_path, allowed_dirs=[given]) is config
    refused(check_version_config, config, config_path, [tmp_path / "other"], names=("settings.offline_dir",))


def test_any_dir_or_path_setting_is_checked(tmp_path, config_path):
    refused(check_version_config, config_2d(cache_path="/etc/passwd"), config_path,
            names=("settings.cache_path",))
    refused(check_version_config, config_2d(weights_dir=7), config_path, names=("settings.weights_dir",))


def test_setting_path_through_a_symlink_out_of_the_workspace_is_refused(tmp_path, config_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    link = config_path.parent.parent.parent / "offline"
    link.symlink_to(outside, target_is_directory=True)
    refused(check_version_config, config_2d(offline_dir=str(link / "folds")), config_path,
            names=("settings.offline_dir",))


@pytest.mark.parametrize("make", [config_2d, config_3d])
def test_unknown_config_key_is_refused(make, config_path):
    config = make()
    config["loader"] = "pickle"
    message = refused(check_version_config, config, config_path, names=(str(config_path),))
    assert message.startswith(f"{config_path}: loader: unknown key")


def test_key_of_the_other_kind_is_refused(config_path):
    config = config_2d()
    config["ds_weights"] = [1.0]
    refused(check_version_config, config, config_path, names=("ds_weights",))


@pytest.mark.parametrize("field, value", [
    ("kind", "4d"), ("num_classes", 1), ("num_classes", "3"), ("num_classes", True), ("settings", None),
    ("template", "landmarks"), ("template_case", "../x"),
])
def test_bad_config_field_is_refused(field, value, config_path):
    config = config_2d()
    config[field] = value
    message = refused(check_version_config, config, config_path, names=(str(config_path),))
    assert message.startswith(f"{config_path}: {field}: "), message


def test_missing_config_key_is_refused(config_path):
    config = config_3d()
    del config["strides"]
    refused(check_version_config, config, config_path, names=("strides", "missing"))


@pytest.mark.parametrize("where", ["settings.learning_rate", "template", "ds_weights", "spacing"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_number_is_refused(where, bad, config_path):
    config = config_3d() if where in ("ds_weights", "spacing") else config_2d()
    if where == "settings.learning_rate":
        config["settings"]["learning_rate"] = bad
    else:
        config[where][0] = bad
    refused(check_version_config, config, config_path, names=(str(config_path), where))


# ---------------------------------------------------------------- version.json

@pytest.fixture
def record_path(tmp_path):
    return tmp_path / "ws" / "models" / "v2" / "version.json"


def test_valid_version_record_is_returned_unchanged(record_path):
    record = version_entry("v2", parent="v1")
    assert check_version_record(record, record_path, dict(record)) == version_entry("v2", parent="v1")
    check_version_record(version_entry("v2", status="training"), record_path)


def test_version_record_name_must_match_its_folder(record_path):
    message = refused(check_version_record, version_entry("v3"), record_path, names=(str(record_path),))
    assert message.startswith(f"{record_path}: name: ")


def test_version_record_must_name_the_manifest_version(record_path):
    refused(check_version_record, version_entry("v2"), record_path, version_entry("v1"),
            names=(str(record_path), "name"))


@pytest.mark.parametrize("field, value", [
    ("name", "../v2"), ("parent", "../../escaped-model"), ("parent", "v2"), ("status", "owned"),
    ("iterations", "many"), ("seconds", math.nan), ("cases_seen", ["../x"]), ("settings", []),
    ("loader", "pickle"),
])
def test_bad_version_record_field_is_refused(field, value, record_path):
    record = version_entry("v2", parent="v1")
    record[field] = value
    message = refused(check_version_record, record, record_path, names=(str(record_path),))
    assert message.startswith(f"{record_path}: {field}: "), message


def test_version_record_missing_field_is_refused(record_path):
    record = version_entry("v2")
    del record["status"]
    refused(check_version_record, record, record_path, names=("status", "missing"))


# ---------------------------------------------------------------- contained

def test_contained_resolves_inside_the_workspace(tmp_path):
    ws = tmp_path / "ws"
    (ws / "imagesTr").mkdir(parents=True)
    assert contained(ws, "imagesTr/a_0000.nii.gz") == (ws / "imagesTr" / "a_0000.nii.gz").resolve()


@pytest.mark.parametrize("relative", ["../x", "/etc/passwd", "imagesTr/../../x", "a\\..\\x", "~/x"])
def test_contained_refuses_escaping_text(tmp_path, relative):
    refused(contained, tmp_path / "ws", relative, names=(str(tmp_path / "ws"),))


def test_contained_refuses_a_symlink_pointing_outside(tmp_path):
    ws = tmp_path / "ws"
    (ws / "imagesTr").mkdir(parents=True)
    secret = tmp_path / "secret.nii.gz"
    secret.write_bytes(b"not yours")
    (ws / "imagesTr" / "a_0000.nii.gz").symlink_to(secret)
    (ws / "labelsTr").symlink_to(tmp_path, target_is_directory=True)
    refused(contained, ws, "imagesTr/a_0000.nii.gz", names=("imagesTr/a_0000.nii.gz", "outside"))
    refused(contained, ws, "labelsTr/a.nii.gz", names=("labelsTr/a.nii.gz", "outside"))


def test_contained_accepts_a_symlink_staying_inside(tmp_path):
    ws = tmp_path / "ws"
    (ws / "predictions").mkdir(parents=True)
    (ws / "predictions" / "a.nii.gz").write_bytes(b"")
    os.symlink(ws / "predictions" / "a.nii.gz", ws / "predictions" / "b.nii.gz")
    assert contained(ws, "predictions/b.nii.gz") == (ws / "predictions" / "a.nii.gz").resolve()


def test_structure_order_with_or_without_its_pitch_is_accepted_and_a_bad_pitch_refused(config_path):
    order = {"axis": 0, "ascending": True, "labels": [1, 2]}
    for extra in ({}, {"pitch_mm": 33.9}):
        config = {**config_2d(), "structure_order": {**order, **extra}}
        assert check_version_config(config, config_path) == config
    for pitch in (-1.0, 0, "far", float("nan")):
        refused(check_version_config, {**config_2d(), "structure_order": {**order, "pitch_mm": pitch}}, config_path,
                names=("structure_order",))
    refused(check_version_config, {**config_2d(), "structure_order": {**order, "spacing": 1.0}}, config_path,
            names=("structure_order",))
