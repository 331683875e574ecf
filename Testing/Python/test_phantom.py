"""The procedural lumbar spine phantom: determinism, labels, contrast, geometry, files."""

import numpy as np
import pytest
import SimpleITK as sitk

from ExtremeAugLogic.errors import InputError
from ExtremeAugLogic.demo.phantom import (DEFAULT_SHAPE, DEFAULT_SPACING, make_phantom,
                                     phantom_names, write_phantom_set)

SMALL = dict(shape=(64, 64, 24), spacing=(3.0, 3.0, 3.5))


@pytest.fixture(scope="module")
def default_phantom():
    image, label = make_phantom(0)
    return image, label, sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label)


def test_same_seed_same_phantom():
    a_img, a_lab = make_phantom(7, **SMALL)
    b_img, b_lab = make_phantom(7, **SMALL)
    assert np.array_equal(sitk.GetArrayFromImage(a_img), sitk.GetArrayFromImage(b_img))
    assert np.array_equal(sitk.GetArrayFromImage(a_lab), sitk.GetArrayFromImage(b_lab))


def test_different_seeds_differ():
    a_img, a_lab = make_phantom(1, **SMALL)
    b_img, b_lab = make_phantom(2, **SMALL)
    assert not np.array_equal(sitk.GetArrayFromImage(a_lab), sitk.GetArrayFromImage(b_lab))
    assert not np.allclose(sitk.GetArrayFromImage(a_img), sitk.GetArrayFromImage(b_img))


def test_default_grid_and_types(default_phantom):
    image, label, arr, lab = default_phantom
    assert arr.shape == DEFAULT_SHAPE == lab.shape
    assert image.GetSpacing() == tuple(reversed(DEFAULT_SPACING))
    assert image.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    assert image.GetPixelID() == sitk.sitkFloat32 and label.GetPixelID() == sitk.sitkUInt8
    for key in ("GetSpacing", "GetOrigin", "GetDirection", "GetSize"):
        assert getattr(image, key)() == getattr(label, key)()
    # default origin: the image centre sits at physical (0, 0, 0)
    centre = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()])
    assert np.allclose(centre, 0.0, atol=1e-6)
    assert np.isfinite(arr).all() and arr.min() >= 0


def test_vertebrae_labels_stacked_and_on_bright_tissue(default_phantom):
    _, _, arr, lab = default_phantom
    assert set(np.unique(lab)) == {0, 1, 2, 3, 4, 5}
    centres = [np.nonzero(lab == v)[0].mean() for v in range(1, 6)]
    assert centres == sorted(centres), "L1..L5 must run superior -> inferior along axis 0"
    background = arr[lab == 0].mean()
    for value in range(1, 6):
        assert arr[lab == value].mean() > background
        assert np.count_nonzero(lab == value) > 200
    # each body is one compact blob: fully inside the field of view, not touching the edges
    z, y, x = np.nonzero(lab)
    assert z.min() > 0 and z.max() < lab.shape[0] - 1 and y.min() > 0 and x.min() > 0


@pytest.mark.parametrize("structures,values", [("discs", range(0, 6)), ("both", range(0, 11))])
def test_disc_modes(structures, values):
    _, label = make_phantom(3, structures=structures, **SMALL)
    lab = sitk.GetArrayFromImage(label)
    assert set(np.unique(lab)) == set(values)
    names = phantom_names(structures)
    assert set(names) == set(values) - {0}
    # discs are numbered inferior first, as in the shared spine-ivd scans
    first = 1 if structures == "discs" else 6
    assert names[first] == "L5-S1"
    assert np.nonzero(lab == first)[0].mean() > np.nonzero(lab == first + 4)[0].mean()


def test_image_does_not_depend_on_structures():
    a, _ = make_phantom(5, structures="vertebrae", **SMALL)
    b, _ = make_phantom(5, structures="both", **SMALL)
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


def test_discs_brighter_than_bodies_on_average():
    image, label = make_phantom(11, structures="both")
    arr, lab = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label)
    assert arr[(lab >= 6)].mean() > arr[(lab >= 1) & (lab <= 5)].mean()


def test_t1_contrast_keeps_the_anatomy_and_turns_the_discs_dark():
    t2, label_t2 = make_phantom(11, structures="both", **SMALL)
    t1, label_t1 = make_phantom(11, structures="both", contrast="t1", **SMALL)
    lab = sitk.GetArrayFromImage(label_t1)
    assert np.array_equal(lab, sitk.GetArrayFromImage(label_t2))
    arr = sitk.GetArrayFromImage(t1)
    assert arr[lab >= 6].mean() < arr[(lab >= 1) & (lab <= 5)].mean()  # discs darker than bodies in T1


def test_custom_geometry():
    direction = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    image, label = make_phantom(2, direction=direction, origin=(10.0, -20.0, 30.5), **SMALL)
    assert image.GetDirection() == direction == label.GetDirection()
    assert image.GetOrigin() == (10.0, -20.0, 30.5) == label.GetOrigin()
    assert image.GetSize() == (24, 64, 64)
    assert image.GetSpacing() == (3.5, 3.0, 3.0)


def test_names():
    assert phantom_names("vertebrae") == {1: "L1", 2: "L2", 3: "L3", 4: "L4", 5: "L5"}
    both = phantom_names("both")
    assert both[1] == "L1" and both[10] == "L1-L2" and len(both) == 10


@pytest.mark.parametrize("kwargs", [dict(structures="ribs"), dict(shape=(8, 64, 64)),
                                    dict(spacing=(1.0, -1.0, 1.0)),
                                    dict(direction=(1, 0, 0, 0, 2, 0, 0, 0, 1)),
                                    dict(origin=(0.0, 1.0)), dict(contrast="flair")])
def test_bad_arguments(kwargs):
    with pytest.raises(InputError):
        make_phantom(0, **kwargs)


def test_write_phantom_set(tmp_path):
    pairs = write_phantom_set(tmp_path / "set", 2, seed0=4, **SMALL)
    assert [p.name for pair in pairs for p in pair] == [
        "phantom01_image.nii.gz", "phantom01_label.nii.gz",
        "phantom02_image.nii.gz", "phantom02_label.nii.gz"]
    image, label = make_phantom(5, **SMALL)
    read_image, read_label = sitk.ReadImage(str(pairs[1][0])), sitk.ReadImage(str(pairs[1][1]))
    assert np.array_equal(sitk.GetArrayFromImage(read_label), sitk.GetArrayFromImage(label))
    assert np.allclose(sitk.GetArrayFromImage(read_image), sitk.GetArrayFromImage(image))
    assert read_image.GetDirection() == image.GetDirection()
    assert np.allclose(read_image.GetOrigin(), image.GetOrigin())
    assert np.allclose(read_label.GetSpacing(), label.GetSpacing())
