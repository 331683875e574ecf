"""Dice, HD95, file evaluation, report and changed voxels."""

import math

import numpy as np
import pytest
import SimpleITK as sitk

from ExtremeAugLogic.errors import InputError
from ExtremeAugLogic.evaluation import (changed_voxels, dice_scores, evaluate_files,
                                        format_report, hausdorff95)


def _cube(shape, start, size, value=1):
    array = np.zeros(shape, np.uint8)
    array[tuple(slice(s, s + size) for s in start)] = value
    return array


def test_dice_hand_computed():
    ref = np.array([[1, 1, 0, 2], [1, 0, 0, 2]], np.uint8)
    pred = np.array([[1, 0, 0, 2], [1, 1, 2, 0]], np.uint8)
    scores = dice_scores(pred, ref)
    # label 1: |A|=3, |B|=3, overlap 2 -> 4/6; label 2: |A|=2, |B|=2, overlap 1 -> 2/4
    assert scores["per_structure"][1] == pytest.approx(4 / 6)
    assert scores["per_structure"][2] == pytest.approx(0.5)
    assert scores["mean_dice"] == pytest.approx((4 / 6 + 0.5) / 2)
    # foreground: |A|=5, |B|=5, overlap 3 -> 0.6
    assert scores["binary_dice"] == pytest.approx(0.6)


def test_dice_perfect_disjoint_and_empty():
    ref = _cube((10, 10, 10), (2, 2, 2), 4)
    assert dice_scores(ref, ref)["per_structure"] == {1: 1.0}
    assert dice_scores(ref.copy(), ref)["mean_dice"] == 1.0
    disjoint = _cube((10, 10, 10), (6, 6, 6), 3)
    assert dice_scores(disjoint, ref)["per_structure"][1] == 0.0
    empty = np.zeros_like(ref)
    assert dice_scores(empty, empty) == {"per_structure": {}, "mean_dice": 1.0, "binary_dice": 1.0}
    assert dice_scores(empty, empty, labels=[1, 2])["per_structure"] == {1: 1.0, 2: 1.0}
    assert dice_scores(empty, ref)["per_structure"][1] == 0.0
    assert dice_scores(ref, empty)["per_structure"][1] == 0.0
    assert not any(math.isnan(v) for v in dice_scores(ref, empty, [1, 2, 3])["per_structure"].values())


def test_mean_dice_counts_only_reference_structures():
    ref = _cube((10, 10, 10), (1, 1, 1), 3)
    pred = ref + _cube((10, 10, 10), (6, 6, 6), 3, value=2)
    scores = dice_scores(pred, ref)
    assert scores["per_structure"] == {1: 1.0, 2: 0.0}
    assert scores["mean_dice"] == 1.0
    assert scores["binary_dice"] == pytest.approx(2 * 27 / (54 + 27))


def test_dice_accepts_sitk_images_and_checks_shape():
    ref = _cube((6, 7, 8), (1, 1, 1), 3)
    assert dice_scores(sitk.GetImageFromArray(ref), sitk.GetImageFromArray(ref))["mean_dice"] == 1.0
    with pytest.raises(InputError, match="prediction: shape"):
        dice_scores(np.zeros((6, 7, 9), np.uint8), ref)


@pytest.mark.parametrize("axis,expected", [(0, 6.0), (1, 2.0), (2, 1.0)])
def test_hd95_shifted_cubes_anisotropic(axis, expected):
    spacing = (3.0, 1.0, 0.5)  # numpy order
    shift = [0, 0, 0]
    shift[axis] = 2
    ref = _cube((24, 24, 24), (4, 4, 4), 10)
    pred = _cube((24, 24, 24), tuple(4 + s for s in shift), 10)
    assert hausdorff95(pred, ref, spacing)[1] == pytest.approx(expected)


def test_hd95_spacing_from_sitk_image():
    ref = _cube((24, 24, 24), (4, 4, 4), 10)
    pred = _cube((24, 24, 24), (6, 4, 4), 10)  # 2 voxels along numpy axis 0 = SimpleITK z
    ref_img, pred_img = sitk.GetImageFromArray(ref), sitk.GetImageFromArray(pred)
    for img in (ref_img, pred_img):
        img.SetSpacing((0.5, 1.0, 3.0))  # x, y, z
    assert hausdorff95(pred_img, ref_img)[1] == pytest.approx(6.0)
    assert hausdorff95(pred, ref)[1] == pytest.approx(2.0)  # plain arrays: 1 mm


def test_hd95_identical_and_empty():
    ref = _cube((12, 12, 12), (2, 2, 2), 5)
    empty = np.zeros_like(ref)
    assert hausdorff95(ref, ref, (1, 1, 1))[1] == 0.0
    assert hausdorff95(empty, ref, (1, 1, 1))[1] is None
    assert hausdorff95(ref, empty, (1, 1, 1))[1] is None
    assert hausdorff95(empty, empty, (1, 1, 1), labels=[1]) == {1: 0.0}


def _write(array, path, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return path


def test_evaluate_files_round_trip(tmp_path):
    ref = _cube((20, 20, 20), (4, 4, 4), 8) + _cube((20, 20, 20), (13, 13, 13), 5, value=2)
    pred = ref.copy()
    pred[pred == 2] = 0
    pred[_cube((20, 20, 20), (14, 13, 13), 5).astype(bool)] = 2  # label 2 moved 1 voxel in z
    ref_path = _write(ref, tmp_path / "ref.nii.gz")
    pred_path = _write(pred, tmp_path / "pred.nii.gz")
    result = evaluate_files(pred_path, ref_path)
    assert result["per_structure"][1] == {"dice": 1.0, "hd95_mm": 0.0}
    assert result["per_structure"][2]["dice"] == pytest.approx(0.8)
    assert result["per_structure"][2]["hd95_mm"] == pytest.approx(2.0)  # 1 voxel of 2 mm in z
    assert result["mean_dice"] == pytest.approx(0.9)
    assert result["mean_hd95_mm"] == pytest.approx(1.0)
    assert evaluate_files(ref_path, ref_path)["binary_dice"] == 1.0
    report = format_report(result, {1: "L1", 2: "L2"})
    assert "L1 (1)" in report and "L2 (2)" in report and "0.800" in report and "mean" in report


def test_evaluate_files_grid_mismatch(tmp_path):
    ref = _cube((10, 10, 10), (2, 2, 2), 4)
    ref_path = _write(ref, tmp_path / "ref.nii.gz")
    moved = _write(ref, tmp_path / "moved.nii.gz", origin=(0.0, 5.0, 0.0))
    with pytest.raises(InputError, match=r"moved\.nii\.gz.*origin"):
        evaluate_files(moved, ref_path)
    small = _write(ref[:9], tmp_path / "small.nii.gz")
    with pytest.raises(InputError, match=r"small\.nii\.gz.*size"):
        evaluate_files(small, ref_path)
    with pytest.raises(InputError, match="missing"):
        evaluate_files(tmp_path / "missing.nii.gz", ref_path)


def test_format_report_missing_values():
    text = format_report({"per_structure": {3: {"dice": 0.0, "hd95_mm": None}},
                          "mean_dice": 0.0, "binary_dice": 0.0, "mean_hd95_mm": None})
    assert "label 3" in text and "n/a" in text
    dice_only = format_report(dice_scores(np.ones((2, 2), np.uint8), np.ones((2, 2), np.uint8)))
    assert "1.000" in dice_only


def test_changed_voxels():
    a = _cube((5, 5, 5), (0, 0, 0), 2)
    b = a.copy()
    b[4, 4, 4] = 3
    b[0, 0, 0] = 0
    assert changed_voxels(a, b) == 2
    assert changed_voxels(sitk.GetImageFromArray(a), sitk.GetImageFromArray(a)) == 0
    with pytest.raises(InputError):
        changed_voxels(a, a[:4])
