"""The 3D MSD recipe: network shapes, augmentation geometry, constant memory, end to end."""

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ExtremeAugLogic.recipes.volume3d import augment as a3
from ExtremeAugLogic.recipes.volume3d import fingerprint as f3
from ExtremeAugLogic.recipes.base import CaseData
from ExtremeAugLogic.recipes.volume3d.recipe import DeepSupervisedDice, Recipe3D, pad_to_patch, target_grid

NO_AUG = a3.Ranges3D(rotation_deg=0.0, scale_min=1.0, scale_max=1.0, translation_frac=0.0,
                     elastic_mm=0.0, noise_std=0.0)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def _phantom(shape=(24, 32, 32), spacing=(2.0, 1.0, 1.0), direction=None, seed=0):
    """A bright noisy ellipsoid labelled 1 (SimpleITK image and label)."""
    rng = np.random.default_rng(seed)
    idx = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    centre = [(n - 1) / 2 for n in shape]
    radii = [0.35 * n * sp for n, sp in zip(shape, spacing)]
    r = sum(((i - c) * sp / rad) ** 2 for i, c, sp, rad in zip(idx, centre, spacing, radii))
    label = (r < 1).astype(np.uint8)
    image = (100.0 * label + rng.normal(0, 30.0, shape) + 50.0).astype(np.float32)
    out = []
    for array in (image, label):
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(tuple(reversed(spacing)))
        img.SetOrigin((4.0, -3.0, 10.0))
        if direction is not None:
            img.SetDirection(direction)
        out.append(img)
    return out


# -- network ------------------------------------------------------------------------------
def test_network_shapes_anisotropic():
    cfg = f3.configure([(30, 200, 200)], [(5.0, 0.7, 0.7)], 3, {"patch_size": [16, 32, 32]}, "cpu")
    cfg["deep_supervision"] = True
    assert cfg["axis_depths"] == [1, 4, 4]
    model = Recipe3D({}).build_model(cfg)
    x = torch.randn(2, 1, 16, 32, 32)
    model.train()
    outs = model(x)
    assert isinstance(outs, list) and len(outs) == cfg["depth"]  # full + depth - 1 auxiliary
    assert [tuple(o.shape[2:]) for o in outs] == [(16, 32, 32), (8, 16, 16), (8, 8, 8), (8, 4, 4)]
    assert all(o.shape[:2] == (2, 3) for o in outs)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 3, 16, 32, 32)


def test_network_is_residual_with_instance_norm():
    from monai.networks.blocks.dynunet_block import UnetResBlock

    cfg = f3.configure([(20, 40, 40)], [(1.0, 1.0, 1.0)], 2, {}, "cpu")
    model = Recipe3D({}).build_model(cfg)
    assert any(isinstance(m, UnetResBlock) for m in model.modules())
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in model.modules())


def test_loss_downsamples_targets_and_weights_levels():
    loss = DeepSupervisedDice([2 / 3, 1 / 3])
    y = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    y[:, :, 2:6, 2:6, 2:6] = 1
    perfect = [(torch.nn.functional.one_hot(t[:, 0], 2).permute(0, 4, 1, 2, 3).float() * 40 - 20)
               for t in (y, y[:, :, ::2, ::2, ::2])]
    assert float(loss(perfect, y)) < 1e-3
    assert float(loss([-perfect[0], -perfect[1]], y)) > 0.9
    assert float(loss(perfect[0], y)) < 1e-3  # a plain tensor (eval / no deep supervision)


# -- augmentation -------------------------------------------------------------------------
def _blocks(shape=(20, 24, 28)):
    label = np.zeros(shape, np.uint8)
    label[3:12, 4:15, 5:20] = 1
    label[12:18, 10:22, 8:14] = 2
    return label


def test_identity_transform_is_an_exact_crop():
    label = _blocks()
    image = np.random.default_rng(0).normal(size=label.shape).astype(np.float32)
    s = a3.PatchSampler3D([image], [label], (8, 8, 8), (1.0, 1.0, 1.0), 1, 0, NO_AUG, "cpu")
    params = a3.sample_transform(np.random.default_rng(0), NO_AUG, (8, 8, 8))
    x, y = s.sample([(0, np.array([9.5, 11.5, 13.5]), params)])
    assert torch.allclose(x[0, 0], torch.from_numpy(image[6:14, 8:16, 10:18]), atol=1e-5)
    assert torch.equal(y[0, 0], torch.from_numpy(label[6:14, 8:16, 10:18]).long())


def test_label_and_image_stay_aligned():
    label = _blocks()
    ranges = a3.Ranges3D(rotation_deg=30.0, elastic_mm=3.0, noise_std=0.0)
    s = a3.PatchSampler3D([label.astype(np.float32)], [label], (16, 16, 16), (1.0, 1.2, 0.9), 4, 0,
                          ranges, "cpu", seed=3)
    for step in range(3):
        x, y = s.batch(step)
        assert x.shape == y.shape == (4, 1, 16, 16, 16) and y.dtype == torch.long
        agree = (x.round().long() == y).float().mean()
        assert agree > 0.93  # only boundary voxels may differ (trilinear vs nearest)


def test_rotation_by_90_degrees_matches_rot90():
    vol = np.random.default_rng(1).normal(size=(9, 9, 9)).astype(np.float32)
    s = a3.PatchSampler3D([vol], [np.zeros_like(vol, np.uint8)], (9, 9, 9), (1.0, 1.0, 1.0), 1, 0,
                          NO_AUG, "cpu")
    params = a3.sample_transform(np.random.default_rng(0), NO_AUG, (9, 9, 9))
    params["angles"] = np.array([math.pi / 2, 0.0, 0.0])
    x, _ = s.sample([(0, np.array([4.0, 4.0, 4.0]), params)])
    got = x[0, 0].numpy()
    assert any(np.allclose(got, np.rot90(vol, k, axes=(1, 2)), atol=1e-4) for k in (1, 3))


def test_scale_zooms_out():
    vol = np.zeros((33, 33, 33), np.float32)
    vol[12:21, 12:21, 12:21] = 1.0
    s = a3.PatchSampler3D([vol], [vol.astype(np.uint8)], (17, 17, 17), (1.0, 1.0, 1.0), 1, 0, NO_AUG, "cpu")
    params = a3.sample_transform(np.random.default_rng(0), NO_AUG, (17, 17, 17))
    params["scale"] = 2.0  # the patch covers twice the extent: the cube looks half as big
    _, y = s.sample([(0, np.array([16.0, 16.0, 16.0]), params)])
    assert 4 ** 3 <= int(y.sum()) <= 6 ** 3


def test_ranges_respected():
    ranges = a3.Ranges3D(rotation_deg=10.0, scale_min=0.9, scale_max=1.1)
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = a3.sample_transform(rng, ranges, (16, 32, 32))
        assert np.all(np.abs(p["angles"]) <= math.radians(10.0))
        assert 0.9 <= p["scale"] <= 1.1
        assert np.all(np.abs(p["shift"]) <= 0.25 * np.array([16, 32, 32]))
        m = a3.affine(p)
        assert np.allclose(m.T @ m, p["scale"] ** 2 * np.eye(3))
        angle = math.degrees(math.acos(np.clip((np.trace(m / p["scale"]) - 1) / 2, -1, 1)))
        assert angle <= 10.0 * math.sqrt(3) + 1e-6
    inplane = a3.sample_transform(rng, ranges, (16, 32, 32), rotate_axes=(0,))
    assert inplane["angles"][1] == inplane["angles"][2] == 0.0


def test_anisotropic_spacing_rotates_in_plane_only():
    label = _blocks()
    s = a3.PatchSampler3D([label.astype(np.float32)], [label], (8, 16, 16), (5.0, 0.7, 0.7), 2, 0,
                          a3.Ranges3D(), "cpu")
    assert s.rotate_axes == (0,)


def test_level_n_constant_memory_and_deterministic():
    label = _blocks()
    image = label.astype(np.float32)
    make = lambda level: a3.PatchSampler3D([image, image], [label, label], (8, 16, 16), (1.0, 1.0, 1.0),
                                           3, level, a3.Ranges3D(), "cpu", seed=7)
    small, huge = make(1), make(10 ** 9)
    assert small.state_bytes() == huge.state_bytes()
    x1, y1 = huge.batch(123456)
    x2, y2 = huge.batch(123456)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # level 2: every base patch has at most two distinct transforms
    two = make(2)
    seen = {}
    for step in range(60):
        for b in range(3):
            case, centre, params = two.draw(step, b)
            key = (case, tuple(centre))
            seen.setdefault(key, set()).add(round(params["scale"], 12))
    assert max(len(v) for v in seen.values()) <= 2
    c, ctr, p = two.fixed_transform(0, 1)
    c2, ctr2, p2 = two.fixed_transform(0, 1)
    assert c == c2 and np.array_equal(ctr, ctr2) and p["scale"] == p2["scale"]


def test_level_zero_prefers_foreground():
    label = np.zeros((40, 40, 40), np.uint8)
    label[30:34, 30:34, 30:34] = 1
    s = a3.PatchSampler3D([label.astype(np.float32)], [label], (8, 8, 8), (1.0, 1.0, 1.0), 8, 0,
                          NO_AUG, "cpu")
    with_fg = sum(int((s.batch(step)[1] > 0).flatten(1).any(1).sum()) for step in range(6))
    assert with_fg >= 0.5 * 48  # 2/3 expected; random patches would almost never hit it


def test_reflect_padding_larger_than_scan():
    x = torch.arange(6, dtype=torch.float32).reshape(1, 1, 6, 1, 1).expand(1, 1, 6, 3, 2).contiguous()
    padded, crop = pad_to_patch(x, (16, 4, 4))
    assert padded.shape == (1, 1, 16, 4, 4)
    assert torch.equal(padded[:, :, crop[0], crop[1], crop[2]], x)
    assert set(padded[0, 0, :, 0, 0].tolist()) <= set(range(6))


# -- recipe end to end --------------------------------------------------------------------
def test_target_grid_keeps_centre_and_direction():
    img, _ = _phantom(direction=(0, 1, 0, 1, 0, 0, 0, 0, -1))
    ref = target_grid(img, (1.0, 2.0, 0.5))
    assert ref.GetSize() == (64, 16, 48)
    assert ref.GetDirection() == img.GetDirection()
    centre = lambda im: im.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in im.GetSize()])
    assert np.allclose(centre(ref), centre(img))


def test_optimizer_schedule():
    recipe = Recipe3D({})
    cfg = {"settings": recipe.settings}
    opt, sched = recipe.optimizer(torch.nn.Linear(2, 2), cfg)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    for _ in range(100):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4 * 0.984)


def test_end_to_end_tiny_training_and_prediction():
    torch.manual_seed(0)
    image, label = _phantom()
    recipe = Recipe3D({"device": "cpu", "learning_rate": 3e-3})
    cases = [CaseData("p1", image, label)]
    cfg = recipe.fit_config(cases, 2)
    json.dumps(cfg)
    assert cfg["kind"] == "3d" and cfg["patch_size"] == [16, 32, 32] and cfg["batch_size"] == 2
    model = recipe.build_model(cfg)
    sampler = recipe.make_sampler(cfg, cases, "cpu", seed=0)
    loss_fn = recipe.loss_function(cfg)
    opt, sched = recipe.optimizer(model, cfg)
    model.train()
    losses = []
    for step in range(24):
        x, y = sampler.batch(step)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert np.mean(losses[-6:]) < np.mean(losses[:6])

    # another grid: non-identity direction, anisotropic spacing, smaller than the patch in z
    other, _ = _phantom(shape=(6, 30, 36), spacing=(3.0, 0.9, 1.1),
                        direction=(0, 1, 0, 1, 0, 0, 0, 0, -1), seed=1)
    calls = []
    probs = recipe.predict_probabilities(model, cfg, other, "cpu", tta=True,
                                         progress=lambda d, t: calls.append((d, t)))
    assert probs.shape == (2, 6, 30, 36) and probs.dtype == np.float32
    assert np.allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    assert calls and calls[-1][0] == calls[-1][1]
