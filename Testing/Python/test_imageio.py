"""Reading and validating scans and label maps (ExtremeAugLogic.workspace.imageio)."""

import numpy as np
import pytest
import SimpleITK as sitk

from ExtremeAugLogic.workspace import imageio
from ExtremeAugLogic.errors import InputError


def _image(array, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing[: img.GetDimension()])
    img.SetOrigin(origin[: img.GetDimension()])
    return img


def _write(img, path):
    sitk.WriteImage(img, str(path))
    return path


def _one_line_starting_with(exc_info, prefix):
    message = str(exc_info.value)
    assert "\n" not in message
    assert message.startswith(str(prefix)), message
    return message


@pytest.mark.parametrize("ext", [".nii", ".nii.gz", ".nrrd", ".mha", ".mhd"])
def test_read_image_formats_give_float32_3d(tmp_path, make_case, ext):
    scan, _ = make_case()
    scan = sitk.Cast(scan, sitk.sitkInt16)
    path = _write(scan, tmp_path / f"scan{ext}")
    img = imageio.read_image(path)
    assert img.GetPixelID() == sitk.sitkFloat32
    assert img.GetSize() == (16, 16, 8)
    assert img.GetSpacing() == pytest.approx((1.0, 1.0, 2.0))


def test_read_image_missing(tmp_path):
    path = tmp_path / "scan.nii.gz"
    with pytest.raises(InputError) as exc:
        imageio.read_image(path)
    assert _one_line_starting_with(exc, path).endswith("not found")


@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.nrrd", "notes.txt"])
def test_read_image_garbage(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00garbage bytes, not an image\x01" * 50)
    with pytest.raises(InputError) as exc:
        imageio.read_image(path)
    assert "cannot be read" in _one_line_starting_with(exc, path)


def test_read_image_folder(tmp_path):
    with pytest.raises(InputError) as exc:
        imageio.read_image(tmp_path)
    assert "folder" in _one_line_starting_with(exc, tmp_path)


def test_read_image_2d_and_4d(tmp_path):
    two_d = _write(_image(np.zeros((8, 8), np.float32)), tmp_path / "flat.nii.gz")
    with pytest.raises(InputError) as exc:
        imageio.read_image(two_d)
    assert "2D" in _one_line_starting_with(exc, two_d)

    vol = _image(np.zeros((3, 4, 5), np.float32))
    four_d = _write(sitk.JoinSeries([vol, vol]), tmp_path / "series.nii.gz")
    with pytest.raises(InputError) as exc:
        imageio.read_image(four_d)
    assert "4D" in _one_line_starting_with(exc, four_d)


def test_single_frame_4d_is_squeezed():
    vol = _image(np.ones((3, 4, 5), np.float32))
    img = imageio.check_image(sitk.JoinSeries([vol]), "one frame")
    assert img.GetSize() == (5, 4, 3)


def test_vector_image_rejected():
    rgb = sitk.Image([4, 4, 3], sitk.sitkVectorUInt8, 3)
    with pytest.raises(InputError) as exc:
        imageio.check_image(rgb, "colour.nrrd")
    assert "components" in _one_line_starting_with(exc, "colour.nrrd")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_intensities(tmp_path, bad):
    array = np.zeros((4, 5, 6), np.float32)
    array[1, 2, 3] = bad
    # NIfTI reading in ITK turns NaN into 0, so use NRRD to keep the bad value on disk.
    path = _write(_image(array), tmp_path / "nan.nrrd")
    with pytest.raises(InputError) as exc:
        imageio.read_image(path)
    assert "NaN or infinite" in _one_line_starting_with(exc, path)


def test_read_label_types(tmp_path):
    small = np.zeros((4, 5, 6), np.float64)
    small[1, 1, 1] = 3.0
    lab = imageio.read_label(_write(_image(small), tmp_path / "float_whole.nii.gz"))
    assert lab.GetPixelID() == sitk.sitkUInt8
    assert imageio.label_values(lab) == [3]

    big = np.zeros((4, 5, 6), np.int32)
    big[0, 0, 0], big[1, 1, 1] = 300, 7
    lab = imageio.read_label(_write(_image(big), tmp_path / "big.nii.gz"))
    assert lab.GetPixelID() == sitk.sitkUInt16
    assert imageio.label_values(lab) == [7, 300]


@pytest.mark.parametrize("array, words", [
    (np.where(np.arange(120).reshape(4, 5, 6) == 7, 1.5, 0.0).astype(np.float32), "non-integer"),
    (np.where(np.arange(120).reshape(4, 5, 6) == 7, -1, 0).astype(np.int16), "negative"),
    (np.zeros((4, 5, 6), np.uint8), "empty"),
    (np.where(np.arange(120).reshape(4, 5, 6) == 7, 70000, 0).astype(np.int32), "too large"),
])
def test_bad_label_values(tmp_path, array, words):
    path = _write(_image(array), tmp_path / "lab.nrrd")
    with pytest.raises(InputError) as exc:
        imageio.read_label(path)
    assert words in _one_line_starting_with(exc, path)


def test_empty_label_allowed_for_predictions():
    lab = imageio.check_label_image(_image(np.zeros((4, 5, 6), np.uint8)), allow_empty=True)
    assert imageio.label_values(lab) == []


def test_label_grid_must_match_reference(tmp_path):
    ref = _image(np.zeros((6, 10, 10), np.float32))
    lab_array = np.zeros((5, 10, 10), np.uint8)
    lab_array[2, 2, 2] = 1
    path = _write(_image(lab_array), tmp_path / "lab.nii.gz")
    with pytest.raises(InputError) as exc:
        imageio.read_label(path, reference=ref, reference_name="scan.nii.gz")
    message = _one_line_starting_with(exc, path)
    assert "grid differs from image scan.nii.gz: size (10, 10, 5) vs (10, 10, 6)" in message


def test_grid_difference_details():
    a = _image(np.zeros((4, 5, 6), np.float32), spacing=(1.0, 1.0, 2.0), origin=(-100.0, 20.0, 3.0))
    b = _image(np.zeros((4, 5, 6), np.float32), spacing=(1.0, 1.0, 2.0), origin=(-100.0, 20.0, 3.0))
    assert imageio.same_grid(a, b) and imageio.grid_difference(a, b) is None

    b.SetSpacing((1.0, 1.0, 2.0 + 1e-7))  # float round-off stays the same grid
    b.SetOrigin((-100.0 + 1e-6, 20.0, 3.0))
    assert imageio.same_grid(a, b)

    b.SetSpacing((1.0, 1.0, 2.5))
    assert imageio.grid_difference(a, b).startswith("spacing")
    b.SetSpacing(a.GetSpacing())
    b.SetOrigin((-99.0, 20.0, 3.0))
    assert imageio.grid_difference(a, b).startswith("origin")
    b.SetOrigin(a.GetOrigin())
    b.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))
    assert imageio.grid_difference(a, b).startswith("direction")
    assert not imageio.same_grid(a, b)


def test_write_image_is_compressed_and_readable(tmp_path, make_case):
    scan, label = make_case()
    target = tmp_path / "sub" / "label.nii.gz"
    imageio.write_image(imageio.check_label_image(label), target)
    back = imageio.read_label(target, reference=scan)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(label))
    assert [p.name for p in target.parent.iterdir()] == ["label.nii.gz"]  # no temp files left
    with open(target, "rb") as handle:
        assert handle.read(2) == b"\x1f\x8b"  # gzip
