"""Where the labelled structures lie in a new scan: the delineated scan registered onto it."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from ExtremeAugLogic import cli
from ExtremeAugLogic.demo import phantom
from ExtremeAugLogic.inference.level_range import (LevelGuide, end_offsets, guide_for_version, guide_from_cases,
                                                   level_verdict)
from ExtremeAugLogic.inference.structure_order import detect_structure_order
from ExtremeAugLogic.workspace import Workspace


def centroid_along(labels, value, axis=0):
    positions = np.nonzero(labels == value)[axis]
    return float(positions.mean())


def shifted(image, millimetres):
    """``image`` with its content moved by ``millimetres`` along the first array axis (same grid)."""
    move = [0.0, 0.0, 0.0]
    move[2] = -millimetres * image.GetDirection()[8]  # array axis 0 is the physical z axis
    interpolator = sitk.sitkNearestNeighbor if image.GetPixelID() == sitk.sitkUInt8 else sitk.sitkLinear
    return sitk.Resample(image, image, sitk.TranslationTransform(3, move), interpolator, 0.0, image.GetPixelID())


@pytest.mark.parametrize("millimetres", [-10.0, 14.0])
def test_the_delineated_scan_registered_onto_a_moved_scan_of_other_contrast_finds_its_ends(millimetres):
    atlas_image, atlas_label = phantom.make_phantom(3)
    t1_image, t1_label = phantom.make_phantom(3, contrast="t1")
    image, label = shifted(t1_image, millimetres), shifted(t1_label, millimetres)
    order = detect_structure_order([sitk.GetArrayViewFromImage(atlas_label)])
    first, last = int(order["labels"][0]), int(order["labels"][-1])
    truth = sitk.GetArrayFromImage(label)
    found = LevelGuide([(atlas_image, atlas_label)], order).range_for(image)
    expected = (centroid_along(truth, first, order["axis"]), centroid_along(truth, last, order["axis"]))
    assert found is not None
    assert np.allclose(found, expected, atol=1.5)  # voxels of 2 mm; the move is 5-7 voxels
    unmoved = (centroid_along(sitk.GetArrayFromImage(t1_label), first, order["axis"]),)
    assert abs(found[0] - unmoved[0]) > 3  # it followed the move


SMALL = {"inplane_size": 40, "patch_size": 40, "stride": 20, "base_features": 4, "depth": 3, "max_features": 16,
         "batch_size": 2}


def small_workspace(root):
    pairs = phantom.write_phantom_set(root / "data", 3, seed0=5, shape=(40, 40, 16), spacing=(4.0, 4.0, 4.0))
    ws = Workspace.create(root / "ws", structure_names=phantom.phantom_names("vertebrae"))
    ws.add_case(*pairs[0], case_id="first", split="train")
    ws.add_to_worklist(pairs[1][0], case_id="waiting")
    return ws, pairs


def test_a_model_asks_for_the_guide_and_every_prediction_path_uses_it(tmp_path):
    ws, pairs = small_workspace(tmp_path)
    sets = [a for k, v in {**SMALL, "level_range": "registration"}.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    assert cli.main(["train", str(ws.path), "--iterations", "2", "--quiet", *sets]) == 0
    name = ws.best_version()
    from ExtremeAugLogic.inference import load_model
    _, config, _, _ = load_model(ws, name, "cpu")
    guide = guide_for_version(ws, name, config)
    assert guide is not None and len(guide.atlases) == 1 and config["settings"]["level_range"] == "registration"
    assert {r["state"] for r in ws.worklist_state()} == {"ready"}  # the worklist was predicted with it
    output = tmp_path / "pred.nii.gz"
    assert cli.main(["predict", str(ws.path), "--image", str(pairs[2][0]), "--output", str(output)]) == 0
    assert output.is_file()
    off = {**config, "settings": {**config["settings"], "level_range": "off"}}
    assert guide_for_version(ws, name, off) is None
    assert guide_from_cases([], off) is None


def test_a_bad_level_range_is_refused_in_one_line_with_nothing_written(tmp_path, capsys):
    ws, _ = small_workspace(tmp_path)
    before = (ws.path / "extremeaug.json").read_text()
    assert cli.main(["train", str(ws.path), "--iterations", "2", "--quiet", "--set", "level_range=sideways"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "level_range" in err[0]
    assert (ws.path / "extremeaug.json").read_text() == before
    models = ws.path / "models"
    assert not models.exists() or not any(models.iterdir())


def test_a_registration_that_fails_gives_no_range_instead_of_an_error(monkeypatch):
    from ExtremeAugLogic.inference import level_range

    atlas_image, atlas_label = phantom.make_phantom(3)
    order = detect_structure_order([sitk.GetArrayViewFromImage(atlas_label)])

    def gives_up(fixed, moving):
        raise RuntimeError("All samples map outside moving image buffer")

    monkeypatch.setattr(level_range, "rigid_transform", gives_up)
    assert LevelGuide([(atlas_image, atlas_label)], order).range_for(atlas_image) is None


LEVELS = {"axis": 0, "labels": [1, 2, 3, 4, 5]}
PITCH = 10.0  # voxels between consecutive levels along axis 0


def chain_of_levels(shape=(60, 8, 8), first_centre=8, labels=(1, 2, 3, 4, 5)):
    """A label map with slabs 6 voxels thick, one level every PITCH voxels along axis 0 from ``first_centre``."""
    labels_map = np.zeros(shape, np.uint8)
    for i, value in enumerate(labels):
        centre = int(first_centre + i * PITCH)
        if 0 <= centre < shape[0]:
            labels_map[max(centre - 3, 0):centre + 3] = value
    return labels_map


def test_levels_agree_with_the_guide_within_half_a_pitch_and_not_when_every_level_is_shifted():
    truth = chain_of_levels()
    expected = (8.0 - 0.5, 48.0 - 0.5)  # slab centroids of the chain above
    assert level_verdict(truth, expected, LEVELS, PITCH)["joins"]
    assert end_offsets(truth, expected, LEVELS, PITCH) == [0.0, 0.0]
    assert level_verdict(chain_of_levels(first_centre=11), expected, LEVELS, PITCH)["joins"]  # 0.3 pitch off: agrees
    shifted = chain_of_levels(shape=(70, 8, 8), first_centre=18)  # every level named one below where it is
    assert end_offsets(shifted, expected, LEVELS, PITCH) == [1.0, 1.0]
    assert not level_verdict(shifted, expected, LEVELS, PITCH)["joins"]
    assert not level_verdict(chain_of_levels(first_centre=14), expected, LEVELS, PITCH)["joins"]  # 0.6 pitch: too far


def test_a_missing_end_fails_the_level_check_only_when_the_scan_shows_where_it_should_be():
    missing_last = chain_of_levels(labels=(1, 2, 3, 4))
    assert end_offsets(missing_last, (7.5, 47.5), LEVELS, PITCH) == [0.0, None]
    assert not level_verdict(missing_last, (7.5, 47.5), LEVELS, PITCH)["joins"]  # L5 lies inside the scan, unlabelled
    cut = chain_of_levels(shape=(44, 8, 8))  # the scan ends before L5's centre: no L5 in the map
    assert not (cut == 5).any()
    assert level_verdict(cut, (7.5, 47.5), LEVELS, PITCH)["joins"]  # the guide puts L5 beyond the last slice


def test_self_training_with_the_level_check_records_each_candidate_and_keeps_only_those_that_agree(tmp_path):
    ws, _ = small_workspace(tmp_path)
    settings = {**SMALL, "pseudo_label_check": "registration", "pseudo_label_confidence": 0.0, "pseudo_label_at": 0.5}
    sets = [a for k, v in settings.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    assert cli.main(["train", str(ws.path), "--iterations", "4", "--quiet", *sets]) == 0
    record = ws.version(ws.best_version())["pseudo_labels"]
    assert set(record["level_check"]) == {"waiting"}  # every confident scan (threshold 0: all) was checked
    check = record["level_check"]["waiting"]
    if check == "no guide":
        assert record["used"] == ["waiting"]
    else:
        assert len(check["offsets"]) == 2
        agrees = all(o is not None and o <= 0.5 for o in check["offsets"])
        assert check["joins"] == agrees or None in check["offsets"]
        assert (record["used"] == ["waiting"]) == check["joins"]
    off = {**settings, "pseudo_label_check": "off"}
    sets = [a for k, v in off.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    assert cli.main(["train", str(ws.path), "--iterations", "4", "--quiet", *sets]) == 0
    record = ws.version(ws.manifest()["versions"][-1]["name"])["pseudo_labels"]
    assert "level_check" not in record and record["used"] == ["waiting"]
