"""Weak-to-strong consistency on worklist slices (recipes.slice2d.consistency)."""

import pytest
import torch

from ExtremeAugLogic.recipes.slice2d.augment import AugmentationRanges, IntensityRanges
from ExtremeAugLogic.recipes.slice2d.consistency import WeakToStrong

STILL = AugmentationRanges(rotation_deg=0.0, scale_min=1.0, scale_max=1.0, translation_px=0.0)
NO_INTENSITY = IntensityRanges()


class Threshold(torch.nn.Module):
    """A 'network' that calls a pixel class 1 where the image is bright, with a sureness set by ``gain``."""

    def __init__(self, gain: float):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(float(gain)))

    def forward(self, x):
        z = self.gain * (x[:, :1] - 0.5)
        return torch.cat([-z, z], dim=1)


def _slices(count=3, size=16):
    slices = torch.zeros(count, 1, size, size)
    slices[:, :, 4:10, 5:12] = 1.0
    return slices


def test_without_a_transform_the_strong_view_is_the_slice_and_its_labels_the_teachers():
    term = WeakToStrong(_slices(), STILL, NO_INTENSITY, patch=16, batch_size=4, threshold=0.9)
    strong, target, mask = term.views(Threshold(gain=20.0))
    assert strong.shape == (4, 1, 16, 16) and torch.equal(strong, _slices()[:1].expand(4, -1, -1, -1))
    assert torch.equal(target, (strong[:, 0] > 0.5).long())
    assert torch.equal(mask, torch.ones_like(mask)) and term.confident_shares == [1.0]


def test_unsure_pixels_and_pixels_from_outside_the_slice_teach_nothing():
    unsure = WeakToStrong(_slices(), STILL, NO_INTENSITY, patch=16, batch_size=2, threshold=0.99)
    strong, target, mask = unsure.views(Threshold(gain=1.0))  # top probability 0.62 at most
    assert mask.sum() == 0 and unsure.confident_shares == [0.0]
    out = torch.randn(2, 2, 16, 16, requires_grad=True)
    assert WeakToStrong.loss(out, target, mask).item() == 0.0
    shifted = WeakToStrong(_slices(), AugmentationRanges(0.0, 1.0, 1.0, translation_px=8.0), NO_INTENSITY,
                           patch=16, batch_size=8, threshold=0.9, seed=3)
    _, _, mask = shifted.views(Threshold(gain=20.0))
    assert 0 < mask.mean() < 1  # the shift brings in pixels from beyond the slice, which do not count


def test_the_loss_teaches_through_the_strong_view_only_and_falls_as_it_agrees():
    term = WeakToStrong(_slices(), AugmentationRanges(rotation_deg=20.0, translation_px=2.0),
                        IntensityRanges(gamma=1.4, noise_std=0.05),
                        patch=16, batch_size=4, threshold=0.9, seed=1)
    teacher = Threshold(gain=20.0)
    strong, target, mask = term.views(teacher)
    assert teacher.gain.grad is None  # the weak view's prediction carries no gradient
    assert mask.mean() > 0.5
    student = Threshold(gain=0.5)
    loss = WeakToStrong.loss(student(strong), target, mask)
    loss.backward()
    assert student.gain.grad is not None and student.gain.grad < 0  # a surer student agrees better
    assert WeakToStrong.loss(Threshold(gain=20.0)(strong), target, mask) < loss


def test_one_sigmoid_channel_uses_the_binary_loss():
    term = WeakToStrong(_slices(), STILL, NO_INTENSITY, patch=16, batch_size=2, threshold=0.9)
    single = lambda x: 20.0 * (x - 0.5)
    strong, target, mask = term.views(single)
    assert torch.equal(target, (strong[:, 0] > 0.5).long())
    assert WeakToStrong.loss(single(strong), target, mask) < 1e-3


def test_patches_smaller_than_the_slice_come_from_inside_it():
    term = WeakToStrong(torch.arange(32 * 32, dtype=torch.float32).reshape(1, 1, 32, 32), STILL, NO_INTENSITY,
                        patch=8, batch_size=16, threshold=0.0, seed=2)
    weak = term.weak_views()
    assert weak.shape == (16, 1, 8, 8)
    steps = weak[:, 0, 1:, :] - weak[:, 0, :-1, :]
    assert torch.all(steps == 32)  # exact crops of the slice: no padding, no interpolation


def test_a_model_without_consistency_training_refuses_it_before_training():
    from ExtremeAugLogic.errors import InputError
    from ExtremeAugLogic.recipes.registry import make_recipe

    with pytest.raises(InputError, match="unlabeled=consistency: the 3d model has no consistency training"):
        make_recipe("3d", {"unlabeled": "consistency"})
    make_recipe("2d", {"unlabeled": "consistency"})  # the 2D model has it
