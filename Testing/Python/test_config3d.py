"""The MSD auto-configuration rules: fingerprint, depth per axis, kernels, patch, memory."""

from pathlib import Path

import numpy as np
import pytest

from ExtremeAugLogic.recipes.volume3d import fingerprint as f3

BIG = {"memory_budget_mb": 1e6, "cpu_max_voxels": None}
SHARED_VB01 = Path(__file__).resolve().parents[3] / "shared" / "data" / "spine-vb" / "vb01_image.nii.gz"


def test_isotropic_128():
    cfg = f3.configure([(128, 128, 128)], [(1.0, 1.0, 1.0)], 2, BIG, "cuda")
    assert cfg["axis_depths"] == [4, 4, 4] and cfg["depth"] == 4
    assert cfg["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 4
    assert cfg["kernels"] == [[3, 3, 3]] * 5
    assert cfg["filters"] == [6, 12, 24, 48, 96]
    assert cfg["patch_size"] == [128, 128, 128] == cfg["patch_size_full"]


def test_isotropic_128_on_cpu_is_capped():
    cfg = f3.configure([(128, 128, 128)], [(1.0, 1.0, 1.0)], 2, {}, "cpu")
    assert np.prod(cfg["patch_size"]) <= f3.CPU_MAX_VOXELS
    assert cfg["patch_size"] == [64, 64, 128]  # largest axis halved, ties: the first
    assert cfg["batch_size"] == 2


def test_shared_spine_shape():
    # numpy (z, y, x) of the spine-vb scans: 224 x 224 x 77, 1 mm isotropic
    cfg = f3.configure([(224, 224, 77)] * 3, [(1.0, 1.0, 1.0)] * 3, 6, BIG, "cuda")
    assert cfg["axis_depths"] == [4, 4, 3]
    assert cfg["through_plane_axis"] == 2  # isotropic: the axis with the fewest voxels
    assert cfg["strides"][-1] == [2, 2, 1] and cfg["kernels"][-1] == [3, 3, 1]
    assert cfg["kernels"][3] == [3, 3, 3]
    assert cfg["patch_size"] == [128, 128, 64]


@pytest.mark.skipif(not SHARED_VB01.exists(), reason="shared data not present")
def test_shared_file_geometry_matches():
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(SHARED_VB01))
    reader.ReadImageInformation()
    assert tuple(reversed(reader.GetSize())) == (224, 224, 77)


def test_small_scan_uses_stride_one_on_short_axis():
    cfg = f3.configure([(20, 40, 40)], [(1.0, 1.0, 1.0)], 2, BIG, "cpu")
    assert cfg["axis_depths"] == [1, 2, 2]
    assert cfg["strides"] == [[1, 1, 1], [2, 2, 2], [1, 2, 2]]
    assert cfg["kernels"] == [[3, 3, 3], [3, 3, 3], [1, 3, 3]]
    assert cfg["patch_size"] == [16, 32, 32]


def test_tiny_scan_still_gets_two_levels():
    depths = f3.axis_depths((6, 10, 12))
    assert max(depths) == 2 and depths[2] == 2 and depths[:2] == [0, 0]
    patch = f3.initial_patch(depths, 0)
    assert patch == [8, 8, 32]  # larger than the scan: filled by reflection


def test_strongly_anisotropic():
    cfg = f3.configure([(30, 512, 512)], [(5.0, 0.7, 0.7)], 3, BIG, "cuda")
    assert cfg["through_plane_axis"] == 0
    assert cfg["axis_depths"] == [1, 4, 4]
    assert cfg["strides"] == [[1, 1, 1], [2, 2, 2], [1, 2, 2], [1, 2, 2], [1, 2, 2]]
    assert cfg["kernels"][2:] == [[1, 3, 3]] * 3
    assert cfg["patch_size"] == [16, 128, 128]


def test_through_plane_cap():
    depths = [5, 5, 5]
    assert f3.initial_patch(depths, 1) == [256, 128, 256]


def test_fingerprint_medians():
    fp = f3.fingerprint([(10, 100, 100), (20, 100, 100), (40, 50, 50)],
                        [(4.0, 1.0, 1.0), (2.0, 1.0, 1.0), (1.0, 2.0, 2.0)])
    assert fp["spacing"] == [2.0, 1.0, 1.0]
    assert fp["shape"] == [20, 100, 100]


def test_memory_reduction_keeps_divisibility():
    full = f3.configure([(128, 128, 128)], [(1.0, 1.0, 1.0)], 2, BIG, "cuda")
    small = f3.configure([(128, 128, 128)], [(1.0, 1.0, 1.0)], 2,
                         {"memory_budget_mb": 60, "cpu_max_voxels": None}, "cuda")
    assert np.prod(small["patch_size"]) < np.prod(full["patch_size"])
    assert small["estimated_memory_mb"] <= 60
    for n, d in zip(small["patch_size"], small["axis_depths"]):
        assert n % 2 ** d == 0
    assert small["strides"] == full["strides"]  # the network stays the same


def test_memory_reduction_stops_at_floor():
    depths = [2, 4, 4]
    strides, _ = f3.strides_and_kernels(depths)
    patch = f3.reduce_patch([32, 128, 128], depths, strides, [6, 12, 24, 48, 96], 4, budget_bytes=1.0)
    assert patch == [8, 16, 16]


def test_memory_estimate_grows_with_batch_and_patch():
    strides, _ = f3.strides_and_kernels([3, 3, 3])
    feats = f3.feature_counts(3)
    a = f3.memory_bytes([64, 64, 64], strides, feats, 2)
    assert f3.memory_bytes([64, 64, 64], strides, feats, 4) == pytest.approx(2 * a)
    assert f3.memory_bytes([32, 64, 64], strides, feats, 2) == pytest.approx(a / 2)
    assert 200 * 2 ** 20 < a < 800 * 2 ** 20  # 312 MB measured (peak RSS, CPU)


def test_user_patch_must_be_divisible():
    with pytest.raises(ValueError):
        f3.configure([(128, 128, 128)], [(1.0, 1.0, 1.0)], 2, {"patch_size": [24, 64, 64]}, "cpu")
    cfg = f3.configure([(128, 128, 128)], [(1.0, 1.0, 1.0)], 2, {"patch_size": [32, 64, 48]}, "cpu")
    assert cfg["patch_size"] == [32, 64, 48]


def test_deep_supervision_weights():
    w = f3.deep_supervision_weights(4)
    assert len(w) == 4 and sum(w) == pytest.approx(1.0)
    assert w[0] == pytest.approx(2 * w[1]) and w[2] == pytest.approx(2 * w[3])
    assert f3.deep_supervision_weights(4, enabled=False) == [1.0]


def test_budget_sources():
    assert f3.memory_budget_bytes("cpu", 100) == 100 * 2 ** 20
    assert 0 < f3.memory_budget_bytes("cpu") <= f3.available_ram_bytes()
