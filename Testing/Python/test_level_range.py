"""Where the labelled structures lie in a new scan: the delineated scan registered onto it."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from ExtremeAugLogic import cli
from ExtremeAugLogic.demo import phantom
from ExtremeAugLogic.inference.level_range import LevelGuide, guide_for_version, guide_from_cases
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
