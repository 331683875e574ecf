"""Intensity augmentation on the device, and the rules that turn probabilities into structure labels."""

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ExtremeAugLogic.demo import phantom
from ExtremeAugLogic.errors import InputError
from ExtremeAugLogic.inference import labels_from_probabilities
from ExtremeAugLogic.recipes.slice2d import augment
from ExtremeAugLogic.recipes.base import CaseData
from ExtremeAugLogic.recipes.slice2d.recipe import Recipe2D, _cut_edges
from ExtremeAugLogic.workspace.imageio import read_label, write_image


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((8, 1, 32, 32), generator=g)


@pytest.mark.parametrize("field,value", [("gamma", 1.5), ("contrast", 1.5), ("brightness", 0.2),
                                         ("bias_field", 0.3), ("noise_std", 0.1), ("remap", 1.0),
                                         ("random_conv", 1.0)])
def test_each_intensity_change_acts_alone_and_is_reproducible(field, value):
    x = _batch()
    ranges = augment.IntensityRanges(**{field: value})
    a = augment.augment_intensity(x, ranges, torch.Generator().manual_seed(3))
    b = augment.augment_intensity(x, ranges, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape and not torch.allclose(a, x)
    assert torch.equal(augment.augment_intensity(x, augment.IntensityRanges()), x)  # all off: untouched


def test_intensity_ranges_hold():
    x = torch.full((256, 1, 16, 16), 0.5)
    shifted = augment.augment_intensity(x, augment.IntensityRanges(brightness=0.1), torch.Generator().manual_seed(0))
    shift = shifted[:, 0, 0, 0] - 0.5
    assert shift.abs().max() <= 0.1 + 1e-6 and shift.std() > 0.03  # spread over the range, within it
    shaded = augment.augment_intensity(x, augment.IntensityRanges(bias_field=0.2), torch.Generator().manual_seed(0))
    ratio = (shaded / x).log()
    assert ratio.abs().max() <= 0.2 + 1e-5
    # a bias field is smooth: neighbouring pixels differ far less than the field's range
    assert (ratio[..., 1:] - ratio[..., :-1]).abs().max() < 0.1
    noisy = augment.augment_intensity(x, augment.IntensityRanges(noise_std=0.05), torch.Generator().manual_seed(0))
    per_sample = (noisy - x).std(dim=(1, 2, 3))
    assert per_sample.max() <= 0.05 * 1.3 and per_sample.min() < 0.02  # std drawn in [0, 0.05]


def test_remapped_intensities_keep_their_order_and_range():
    x = _batch(1)
    y = augment.remap_intensity(x, 1.0, torch.Generator().manual_seed(0))
    for a, b in zip(x.reshape(len(x), -1), y.reshape(len(y), -1)):
        order = a.argsort()
        assert torch.all(b[order][1:] >= b[order][:-1] - 1e-6)  # an increasing curve: no two tissues swap
        assert b.min() >= a.min() - 1e-6 and b.max() <= a.max() + 1e-6
    assert not torch.allclose(x, y)
    kept = augment.remap_intensity(x, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(kept, x)  # probability 0: untouched


def test_random_convolution_keeps_each_sample_mean_and_changes_texture():
    x = _batch(2)
    y = augment.random_convolution(x, 1.0, torch.Generator().manual_seed(0))
    assert torch.allclose(y.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-4)
    assert (y - x).abs().mean() > 0.01
    assert torch.equal(augment.random_convolution(x, 0.0, torch.Generator().manual_seed(0)), x)
    three = torch.rand((4, 3, 16, 16))  # 2.5D input: every channel goes through the same sample's network
    assert augment.random_convolution(three, 1.0, torch.Generator().manual_seed(0)).shape == three.shape


def test_structure_intensity_scales_the_structures_and_fades_at_their_outline():
    x = torch.full((64, 1, 32, 32), 0.5)
    y = torch.zeros((64, 1, 32, 32), dtype=torch.long)
    y[:, :, 8:24, 8:24] = 2
    out = augment.vary_structure_intensity(x, y, 1.4, torch.Generator().manual_seed(0))
    assert torch.equal(out, augment.vary_structure_intensity(x, y, 1.4, torch.Generator().manual_seed(0)))
    factor = out[:, 0, 16, 16] / 0.5
    assert factor.min() >= 1 / 1.4 - 1e-5 and factor.max() <= 1.4 + 1e-5
    assert factor.min() < 0.85 and factor.max() > 1.2  # spread over the range, one factor per sample
    inside, outside = out[:, :, 11:21, 11:21], torch.cat([out[:, :, :5], out[:, :, -5:]], dim=2)
    assert torch.allclose(inside, factor[:, None, None, None] * 0.5) and torch.equal(outside, x[:, :, :10])
    ramp = (out[:, 0, 16, 5:12] - 0.5).abs()  # across the outline the change grows step by step
    assert torch.all(ramp[:, 1:] >= ramp[:, :-1] - 1e-6) and torch.all(ramp[:, 0] < ramp[:, -1] + 1e-6)
    assert torch.equal(augment.vary_structure_intensity(x, y, 1.0, torch.Generator().manual_seed(0)), x)


def test_the_recipe_varies_the_structures_intensity_when_set():
    image, label = phantom.make_phantom(5, shape=(48, 48, 16))
    cases = [CaseData("p5", image, label)]

    def batch(spread):
        recipe = Recipe2D({"structure_intensity": spread, "remap": 0.0, "random_conv": 0.0, "gamma": 1.0,
                           "contrast": 1.0, "brightness": 0.0, "bias_field": 0.0, "noise_std": 0.0, "batch_size": 8})
        config = recipe.fit_config(cases, 6)
        return recipe.make_sampler(config, cases, "cpu", 0).batch(0)

    (plain, y), (varied, y2) = batch(1.0), batch(1.5)
    assert torch.equal(y, y2)  # the same patches: only the intensities change
    inside = F.max_pool2d((y == 0).float(), 5, stride=1, padding=2) == 0  # 3 px or more inside a structure
    near = F.max_pool2d((y > 0).float(), 5, stride=1, padding=2) > 0  # within 2 px of one
    assert inside.any() and not torch.allclose(varied[inside], plain[inside])
    assert torch.equal(varied[~near], plain[~near])  # the rest of the patch untouched


def _cut_edges_seen(edges=(0, 1, 2, 3)):
    """Cut 64 samples with probability 1; check each cut, return the set of edges used."""
    x = torch.rand((64, 3, 20, 20)) + 1.0  # no zero before the cut
    y = torch.randint(1, 4, (64, 1, 20, 20))
    cx, cy = augment.cut_field_of_view(x, y, 1.0, 0.5, torch.Generator().manual_seed(0), edges)
    blank_x, blank_y = (cx == 0).all(dim=1), (cy == 0)[:, 0]
    assert torch.equal(blank_x, blank_y)  # the label loses exactly what the image loses
    assert torch.equal(cx[~(cx == 0)], x[~(cx == 0)]) and torch.equal(cy[cy > 0], y[cy > 0])
    seen = set()
    for band in blank_x:
        rows, cols = band.all(dim=1), band.all(dim=0)
        depth = int(band.sum()) // 20
        assert depth <= 10  # at most half the patch
        if depth:
            # one band along one edge, full width
            assert band.sum() == depth * 20
            edge = ("top" if rows[:depth].all() else "bottom" if rows[-depth:].all()
                    else "left" if cols[:depth].all() else "right")
            assert edge != "right" or cols[-depth:].all()
            seen.add(edge)
    kept_x, kept_y = augment.cut_field_of_view(x, y, 0.0, 0.5, torch.Generator().manual_seed(0), edges)
    assert torch.equal(kept_x, x) and torch.equal(kept_y, y)  # probability 0: untouched
    return seen


def test_field_of_view_cut_blanks_one_edge_band_in_image_and_label_alike():
    assert _cut_edges_seen() == {"top", "bottom", "left", "right"}
    assert _cut_edges_seen((0, 1)) == {"top", "bottom"}


def test_field_of_view_cuts_follow_the_structure_order_axis():
    stack = np.zeros((6, 40, 40), np.int64)
    for level in (1, 2, 3):  # three structures one above the other: ordered along the rows
        stack[:, 10 * level - 5:10 * level + 2, 12:28] = level
    assert _cut_edges("order", stack) == (0, 1)
    assert _cut_edges("order", stack.transpose(0, 2, 1)) == (2, 3)  # ordered along the columns
    assert _cut_edges("order", (stack > 0).astype(np.int64)) == (0, 1, 2, 3)  # one structure: no order
    assert _cut_edges("any", stack) == (0, 1, 2, 3)
    with pytest.raises(InputError, match="fov_cut_edges"):
        _cut_edges("sides", stack)


def test_foreground_is_decided_before_the_structure():
    # a boundary voxel: background 0.4, its foreground split 0.3 / 0.3 between two levels
    probabilities = np.zeros((3, 4, 4, 4), np.float32)
    probabilities[0] = 1.0
    probabilities[:, 1:3, 1:3, 1:3] = np.array([0.1, 0.8, 0.1])[:, None, None, None]
    probabilities[:, 1, 1, 1] = [0.4, 0.3, 0.3]
    per_object = labels_from_probabilities(probabilities, {"settings": {}}, "per-object", 0)
    assert per_object[1, 1, 1] == 1 and (per_object > 0).sum() == 8
    off = labels_from_probabilities(probabilities, {"settings": {}}, "off", 0)
    assert off[1, 1, 1] == 0  # the plain argmax loses it


def _stack_probabilities(levels, shape=(50, 12, 12), soft=0.9):
    """Boxes stacked along axis 0; ``levels[i]`` is the label the probabilities favour in box i."""
    k = max(levels) + 1
    p = np.zeros((k, *shape), np.float32)
    p[0] = 1.0
    for i, level in enumerate(levels):
        z0 = 2 + i * 10
        p[:, z0:z0 + 8, 2:10, 2:10] = (1 - soft) / (k - 1)
        p[level, z0:z0 + 8, 2:10, 2:10] = soft
    return p


def test_rules_for_structure_labels():
    config = {"settings": {}, "structure_order": {"axis": 0, "ascending": True, "labels": [1, 2, 3, 4]}}
    probabilities = _stack_probabilities([1, 3, 2, 4])  # the network swapped two levels
    # a flipped slice inside box 0 (its argmax says 2 there)
    probabilities[:, 5, 2:10, 2:10] = 0.02
    probabilities[2, 5, 2:10, 2:10] = 0.5
    probabilities[1, 5, 2:10, 2:10] = 0.44
    off = labels_from_probabilities(probabilities, config, "off", 0)
    per_object = labels_from_probabilities(probabilities, config, "per-object", 0)
    ordered = labels_from_probabilities(probabilities, config, "ordered", 0)
    assert off[5, 5, 5] == 2 and per_object[5, 5, 5] == 1  # one label per object
    assert per_object[15, 5, 5] == 3 and per_object[25, 5, 5] == 2  # per object keeps the swap
    assert [ordered[z, 5, 5] for z in (5, 15, 25, 35)] == [1, 2, 3, 4]  # order fixes it
    assert labels_from_probabilities(probabilities, {"settings": {"objects": "per-object"}}, None, 0)[5, 5, 5] == 1
    with pytest.raises(InputError, match="objects"):
        labels_from_probabilities(probabilities, config, "sideways", 0)


def test_training_stores_the_structure_order_and_predict_applies_it(tmp_path, tiny_phantom_model):
    ws, pairs = tiny_phantom_model()
    config = json.loads((ws.model_dir("v1") / "config.json").read_text())
    order = config["structure_order"]
    assert order["axis"] == 0 and sorted(order["labels"]) == sorted(ws.structure_names())
    assert order["labels"] in (sorted(order["labels"]), sorted(order["labels"], reverse=True))
    assert 4.0 <= order["pitch_mm"] <= 48 * 4.0  # at least a voxel, at most the scan (mm, 4 mm voxels)
    outputs = {}
    for rule in ("off", "ordered", "ordered-split"):
        out = tmp_path / f"{rule}.nii.gz"
        done = subprocess.run([sys.executable, "-m", "ExtremeAugLogic", "predict", ws.path, "--image", pairs[1][0],
                               "--output", out, "--objects", rule], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        outputs[rule] = sitk.GetArrayFromImage(read_label(out, allow_empty=True))
    assert outputs["off"].shape == outputs["ordered"].shape
    assert set(np.unique(outputs["ordered"])) <= {0, *ws.structure_names()}
    assert set(np.unique(outputs["ordered-split"])) <= {0, *ws.structure_names()}
    bad = subprocess.run([sys.executable, "-m", "ExtremeAugLogic", "predict", ws.path, "--image", pairs[1][0],
                          "--output", tmp_path / "x.nii.gz", "--objects", "sideways"], capture_output=True, text=True)
    assert bad.returncode == 2 and not (tmp_path / "x.nii.gz").exists()


def test_a_2_5d_model_trains_and_predicts_on_the_scan_grid(tiny_phantom_model):
    ws, pairs = tiny_phantom_model(seed0=7, context_slices=1, context_step=2, remap=0.5, random_conv=0.5, fov_cut=0.5)
    from ExtremeAugLogic.inference.predict import load_model

    recipe, config, model, _ = load_model(ws, None, "cpu")
    assert model.stem.conv.unit0.conv.in_channels == 3  # the slice and one neighbour on each side
    image = sitk.ReadImage(str(pairs[1][0]))
    probabilities = recipe.predict_probabilities(model, config, image, "cpu")
    assert probabilities.shape == (config["num_classes"], *sitk.GetArrayViewFromImage(image).shape)
    assert np.allclose(probabilities.sum(axis=0), 1.0, atol=1e-4)
