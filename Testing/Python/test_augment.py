"""Extreme augmentation: ranges measured from the applied transforms, alignment, memory."""

import math

import numpy as np
import torch

from ExtremeAugLogic.recipes.slice2d import augment


def _fit_affine(grid: torch.Tensor, size: int, patch: int, centre: float):
    """Recover (angle, scale, shift) of each sample from its sampling grid by least squares.

    The grid maps patch offsets ``o`` to slice pixels ``src = c + A^-1 (o - t)``, so the
    applied transform ``A = s R`` and shift ``t = A (c - offset)`` follow from the fit.
    """
    src = ((grid.flip(-1) + 1.0) * size - 1.0) / 2.0  # back to (row, col) pixel coordinates
    offsets = torch.arange(patch, dtype=torch.float64) - (patch - 1) / 2.0
    rows, cols = torch.meshgrid(offsets, offsets, indexing="ij")
    out = torch.stack([rows.ravel(), cols.ravel(), torch.ones(patch * patch, dtype=torch.float64)], 1)
    results = []
    for b in range(grid.shape[0]):
        coef, *_ = torch.linalg.lstsq(out, src[b].reshape(-1, 2).double())
        inv = coef[:2].T  # src = inv @ o + offset
        fwd = torch.linalg.inv(inv)  # = s R
        scale = math.sqrt(abs(torch.det(fwd).item()))
        angle = math.atan2(fwd[1, 0].item(), fwd[0, 0].item())
        shift = fwd @ (torch.full((2,), centre - 0.5, dtype=torch.float64) - coef[2])
        results.append((angle, scale, shift))
    return results


def test_ranges_measured_from_applied_transforms():
    ranges = augment.AugmentationRanges()
    n, size, patch = 400, 256, 32
    ids = torch.arange(n)
    params = augment.transform_parameters(ranges, n, "cpu", seed=3, patch_ids=ids, k=ids % 7)
    centres = torch.full((n, 2), 128)
    grid = augment.sampling_grid(centres, params, patch, size)
    fitted = _fit_affine(grid, size, patch, 128)
    angles = np.degrees([a for a, _, _ in fitted])
    scales = np.array([s for _, s, _ in fitted])
    assert angles.min() >= -20.001 and angles.max() <= 20.001
    assert angles.min() < -18 and angles.max() > 18  # the whole range is used
    assert scales.min() >= 0.8 - 1e-4 and scales.max() <= 1.2 + 1e-4
    assert scales.min() < 0.82 and scales.max() > 1.18
    shifts = np.array([t.numpy() for _, _, t in fitted])
    assert np.abs(shifts).max() <= 50.0 + 1e-3
    assert shifts.min() < -45 and shifts.max() > 45
    # what the grids apply is exactly what was drawn
    assert np.allclose(np.radians(angles), params["angle"].numpy(), atol=1e-5)
    assert np.allclose(scales, params["scale"].numpy(), atol=1e-5)
    assert np.allclose(shifts, params["shift"].numpy(), atol=1e-3)


def test_fixed_transforms_per_patch_and_level():
    ranges = augment.AugmentationRanges()
    ids, k = torch.tensor([5, 5, 6]), torch.tensor([2, 2, 2])
    a = augment.transform_parameters(ranges, 3, "cpu", seed=1, patch_ids=ids, k=k)
    b = augment.transform_parameters(ranges, 3, "cpu", seed=1, patch_ids=ids, k=k)
    assert torch.equal(a["angle"], b["angle"])  # the same (patch, k) gives the same transform
    assert a["angle"][0] == a["angle"][1] and a["angle"][0] != a["angle"][2]


def test_identity_transform_is_an_exact_crop_and_shift_moves_content():
    images = torch.rand(2, 1, 64, 64)
    identity = {"angle": torch.zeros(1), "scale": torch.ones(1), "shift": torch.zeros(1, 2)}
    grid = augment.sampling_grid(torch.tensor([[32, 32]]), identity, 32, 64)
    x, _ = augment.sample_patches(images, None, torch.tensor([1]), grid)
    assert torch.equal(x[0, 0], images[1, 0, 16:48, 16:48])
    shifted = {**identity, "shift": torch.tensor([[5.0, -3.0]])}
    grid = augment.sampling_grid(torch.tensor([[32, 32]]), shifted, 32, 64)
    x, _ = augment.sample_patches(images, None, torch.tensor([1]), grid)
    assert torch.allclose(x[0, 0, 5:, :29], images[1, 0, 16:43, 19:48])


def test_padding_modes_outside_the_slice():
    images = torch.rand(1, 1, 64, 64) + 0.5
    labels = torch.ones(1, 1, 64, 64, dtype=torch.uint8)
    up = {"angle": torch.zeros(1), "scale": torch.ones(1), "shift": torch.tensor([[20.0, 0.0]])}
    grid = augment.sampling_grid(torch.tensor([[16, 32]]), up, 32, 64)  # 16 rows above the slice
    inside, outside = (slice(None), slice(None), slice(20, None)), (slice(None), slice(None), slice(0, 12))
    for padding, image_outside, label_outside in [("zeros", "zero", 0), ("reflection", "mirror", 1),
                                                  ("reflection-background", "mirror", 0)]:
        x, y = augment.sample_patches(images, labels, torch.tensor([0]), grid, padding)
        assert (y[inside] == 1).all()
        assert (y[outside] == label_outside).all(), padding
        if image_outside == "zero":
            assert (x[outside] == 0).all()
        else:  # patch row r (slice row r - 20) shows slice row 19 - r, mirrored at the edge
            assert torch.allclose(x[0, 0, 0:12], images[0, 0, 8:20, 16:48].flip(0), atol=1e-5), padding


def test_image_and_label_stay_aligned_after_augmentation():
    label = torch.zeros(3, 1, 128, 128, dtype=torch.uint8)
    label[:, :, 30:70, 40:100] = 1
    label[:, :, 80:110, 20:60] = 2
    image = label.float() * 0.4 + 0.1  # intensity is a function of the label
    centres = np.array([[0, 64, 64], [1, 50, 70], [2, 90, 40]])
    sampler = augment.OnTheFlySampler(image, label, centres, level=10, ranges=augment.AugmentationRanges(),
                                      patch=64, batch_size=32, seed=0)
    x, y = sampler.batch(0)
    expected = y.float() * 0.4 + 0.1
    agree = (x - expected).abs() < 1e-3
    # disagreement only on the one-pixel rim of each structure (bilinear vs nearest)
    assert agree.float().mean() > 0.97
    assert y.max() == 2 and y.dtype == torch.long


def test_memory_does_not_grow_with_level():
    images = torch.rand(4, 1, 64, 64)
    labels = (images > 0.5).to(torch.uint8)
    centres = np.array([[i, 32, 32] for i in range(4)])
    sizes = []
    for level in (5, 50, 5000):
        sampler = augment.OnTheFlySampler(images, labels, centres, level, augment.AugmentationRanges(), 32, 8)
        held = sum(t.numel() * t.element_size() for t in vars(sampler).values() if isinstance(t, torch.Tensor))
        sizes.append(held)
        assert sampler.distinct_samples == 4 * level
    assert sizes[0] == sizes[1] == sizes[2]


def test_offline_dataset_matches_on_the_fly_transforms(tmp_path):
    images = torch.rand(2, 1, 64, 64)
    labels = (images > 0.5).to(torch.uint8)
    centres = np.array([[0, 32, 32], [1, 20, 40]])
    ranges = augment.AugmentationRanges()
    info = augment.write_offline_dataset(images, labels, centres, 3, ranges, tmp_path, patch=32, seed=4, chunk=2)
    assert info["samples"] == 6
    x = np.load(tmp_path / "images.npy", mmap_mode="r")
    y = np.load(tmp_path / "labels.npy", mmap_mode="r")
    assert x.shape == (6, 32, 32) and y.dtype == np.uint8
    # sample 1*3+2 is transform k=2 of base patch 1
    params = augment.transform_parameters(ranges, 1, "cpu", 4, torch.tensor([1]), torch.tensor([2]))
    grid = augment.sampling_grid(torch.tensor([[20, 40]]), params, 32, 64)
    ref, ref_y = augment.sample_patches(images, labels, torch.tensor([1]), grid)
    assert np.allclose(x[5], ref[0, 0].numpy(), atol=1e-3)
    assert np.array_equal(y[5], ref_y[0, 0].numpy())
    batch_x, batch_y = augment.OfflineSampler(tmp_path, batch_size=4).batch(0)
    assert batch_x.shape == (4, 1, 32, 32) and batch_y.shape == (4, 1, 32, 32)


def test_aspect_stretch_stays_in_its_range_and_keeps_the_default_draws():
    plain = augment.AugmentationRanges()
    stretched = augment.AugmentationRanges(aspect=1.2)
    ids = torch.arange(300)
    a = augment.transform_parameters(plain, 300, "cpu", seed=2, patch_ids=ids, k=ids % 5)
    b = augment.transform_parameters(stretched, 300, "cpu", seed=2, patch_ids=ids, k=ids % 5)
    assert "aspect" not in a  # without a stretch the paper's transforms are unchanged
    for key in ("angle", "scale", "shift"):
        assert torch.equal(a[key], b[key])
    assert b["aspect"].min() >= 1 / 1.2 - 1e-5 and b["aspect"].max() <= 1.2 + 1e-5
    assert b["aspect"].min() < 1 / 1.15 and b["aspect"].max() > 1.15
    # the grid of a pure stretch (no rotation, scale 1, no shift): rows sampled 1/a apart, columns a apart
    one = {"angle": torch.zeros(1), "scale": torch.ones(1), "shift": torch.zeros(1, 2), "aspect": torch.tensor([1.25])}
    grid = augment.sampling_grid(torch.tensor([[64, 64]]), one, 16, 128)
    src = ((grid.flip(-1) + 1.0) * 128 - 1.0) / 2.0
    assert torch.allclose(src[0, 1:, 0, 0] - src[0, :-1, 0, 0], torch.full((15,), 1 / 1.25))
    assert torch.allclose(src[0, 0, 1:, 1] - src[0, 0, :-1, 1], torch.full((15,), 1.25))


def test_bending_is_smooth_bounded_and_moves_image_and_label_together():
    size, patch = 64, 64
    params = {"angle": torch.zeros(8), "scale": torch.ones(8), "shift": torch.zeros(8, 2)}
    grid = augment.sampling_grid(torch.full((8, 2), 32), params, patch, size)
    generator = torch.Generator().manual_seed(0)
    bent = augment.bend_grid(grid, 4.0, size, generator)
    moved = (bent - grid) * size / 2.0  # in slice pixels
    assert moved.abs().max() <= 4.0 + 1e-4 and moved.abs().max() > 2.0
    assert (moved[:, 1:] - moved[:, :-1]).abs().max() < 0.5  # neighbours move together
    image = torch.zeros(1, 1, size, size)
    image[..., 20:44, 24:40] = 1.0
    label = (image > 0).long()
    x, y = augment.sample_patches(image, label, torch.zeros(8, dtype=torch.long), bent, "zeros")
    assert not torch.equal(x, augment.sample_patches(image, None, torch.zeros(8, dtype=torch.long), grid, "zeros")[0])
    inside = x[:, 0] > 0.99
    assert torch.equal(inside, inside & (y[:, 0] == 1))  # the label follows the bent image


def test_a_shrinking_aspect_or_negative_bending_is_refused():
    import pytest
    from ExtremeAugLogic.errors import InputError
    for bad in ({"aspect": 0.8}, {"elastic_px": -1}):
        with pytest.raises(InputError, match="aspect must be >= 1"):
            augment.AugmentationRanges.from_settings(bad)
