"""Preprocessing (slice axis, in-plane fit, intensity) and patch positions/statistics."""

import numpy as np
import pytest
import SimpleITK as sitk

from ExtremeAugLogic.recipes.slice2d import patches, preprocess


def _image(shape_zyx, spacing_xyz=(1.0, 1.0, 1.0), direction=None, seed=0):
    array = np.random.default_rng(seed).random(shape_zyx).astype(np.float32) * 100
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing_xyz)
    if direction is not None:
        image.SetDirection(direction)
    return image


def test_auto_axis_slices_the_acquisition_plane():
    # sagittal-style scan: 224 x 224 x 77 (numpy), thin in left-right -> sagittal slices
    assert preprocess.choose_slice_axis(_image((224, 224, 77))) == 2
    # thick slices along z (spacing 5 mm) -> slice along numpy axis 0
    assert preprocess.choose_slice_axis(_image((20, 64, 64), (0.7, 0.7, 5.0))) == 0


def test_anatomical_axes_follow_the_direction_matrix():
    image = _image((30, 40, 50), direction=(0, 0, 1, 1, 0, 0, 0, 1, 0))  # index x -> S, y -> L? permuted
    d = np.array(image.GetDirection()).reshape(3, 3)
    axial_index = int(np.argmax(np.abs(d[2])))
    assert preprocess.choose_slice_axis(image, "axial") == 2 - axial_index
    with pytest.raises(ValueError):
        preprocess.choose_slice_axis(image, "oblique")


def test_pad_keeps_aspect_and_reflects_while_stretch_fills():
    geometry = preprocess.plan_slices((224, 224, 77), (1.0, 1.0, 1.0), axis=0, size=256, fit="pad")
    assert geometry.resized_hw == (256, 88) and geometry.pad == ((0, 0), (84, 84))
    volume = np.random.default_rng(0).random((4, 224, 77)).astype(np.float32)
    slices = preprocess.to_slices(volume, geometry, pad_mode="reflect")
    assert slices.shape == (4, 256, 256)
    assert np.allclose(slices[:, :, 84 - 1], slices[:, :, 84 + 1])  # mirrored about the first column
    zero = preprocess.to_slices(volume, geometry, pad_mode="zero")
    assert np.all(zero[:, :, :84] == 0)
    stretch = preprocess.plan_slices((224, 224, 77), (1.0, 1.0, 1.0), axis=0, size=256, fit="stretch")
    assert stretch.resized_hw == (256, 256) and stretch.pad == ((0, 0), (0, 0))


@pytest.mark.parametrize("fit", ["pad", "stretch"])
def test_slices_map_back_onto_the_original_grid(fit):
    volume = np.zeros((12, 40, 30), np.float32)
    volume[3:9, 10:30, 5:20] = 1.0
    for axis in range(3):
        geometry = preprocess.plan_slices(volume.shape, (1.0, 1.5, 2.0), axis, 64, fit)
        slices = preprocess.to_slices(volume, geometry)
        back = preprocess.from_slices(slices[None], geometry)[0]
        assert back.shape == volume.shape
        assert np.mean((back > 0.5) == (volume > 0.5)) > 0.97


def test_labels_resample_with_nearest_values_only():
    label = np.zeros((5, 30, 20), np.uint8)
    label[:, 5:15, 5:10] = 3
    geometry = preprocess.plan_slices(label.shape, (1, 1, 1), 0, 64, "pad")
    slices = preprocess.to_slices(label, geometry, is_label=True)
    assert set(np.unique(slices)) == {0, 3}


def test_intensity_matching_maps_onto_the_template():
    rng = np.random.default_rng(1)
    ref = sitk.GetImageFromArray((rng.gamma(2.0, 30.0, (20, 40, 40))).astype(np.float32))
    other = sitk.GetImageFromArray((rng.gamma(2.0, 30.0, (20, 40, 40)) * 7 + 500).astype(np.float32))
    template = preprocess.make_template(ref)
    matched = preprocess.normalise_intensity(other, "match", template)
    reference = preprocess.normalise_intensity(ref, "match", template)
    # the same distribution up to a linear change of scale ends on the same [0, 1] scale
    assert abs(np.median(matched) - np.median(reference)) < 0.03
    assert 0.0 <= matched.min() and matched.max() <= 1.5
    unit = preprocess.normalise_intensity(other, "percentile", None)
    assert unit.min() == 0.0 and unit.max() == 1.0


def test_grid_patch_counts_and_last_patch_flush():
    assert patches.grid_starts(256, 128, 64) == [0, 64, 128]
    assert patches.grid_starts(200, 128, 64) == [0, 64, 72]
    assert patches.grid_starts(100, 128, 64) == [0]
    centres = patches.grid_centres(5, 256, 128, 64)
    assert len(centres) == 5 * 9


def test_edge_statistics_count_cut_structures():
    labels = np.zeros((1, 256, 256), np.uint8)
    labels[0, 100:160, 100:160] = 1  # a 60 px square in the middle
    stats = patches.edge_statistics(labels, patches.grid_centres(1, 256, 128, 64), 128)
    assert stats["patches"] == 9
    assert stats["with_foreground"] == 9  # every grid patch overlaps the middle square
    # only the centre patch (64..192) holds the whole square
    assert stats["cutting_a_structure"] == 8


def test_foreground_sampling_puts_foreground_in_most_patches():
    labels = np.zeros((10, 256, 256), np.uint8)
    labels[2:4, 20:40, 200:230] = 1
    labels[6, 100:120, 30:50] = 2
    grid = patches.base_centres(labels, sampling="grid")
    fg = patches.base_centres(labels, sampling="foreground", fg_fraction=0.67)
    grid_stats = patches.edge_statistics(labels, grid, 128)
    fg_stats = patches.edge_statistics(labels, fg, 128)
    assert grid_stats["foreground_fraction"] < 0.2
    assert fg_stats["foreground_fraction"] > 0.6
    centred = fg[[labels[s, r, c] > 0 for s, r, c in fg]]
    assert {int(labels[s, r, c]) for s, r, c in centred} == {1, 2}  # every structure is a centre


def test_neighbouring_slices_become_channels_in_order():
    from ExtremeAugLogic.recipes.slice2d.preprocess import with_neighbours

    slices = np.arange(5, dtype=np.float32)[:, None, None] * np.ones((5, 2, 2), np.float32)
    plain = with_neighbours(slices, 0, 1)
    assert plain.shape == (5, 1, 2, 2) and np.array_equal(plain[:, 0], slices)
    context = with_neighbours(slices, 1, 2)
    assert context.shape == (5, 3, 2, 2)
    assert context[2, :, 0, 0].tolist() == [0, 2, 4]  # slice 2 with slices 0 and 4 (two apart)
    assert context[0, :, 0, 0].tolist() == [0, 0, 2]  # the scan's edge repeats
    assert context[4, :, 0, 0].tolist() == [2, 4, 4]
