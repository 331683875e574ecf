"""Test-time views (recipes.slice2d.views): the geometry of the warps, the averaging, the setting."""

import numpy as np
import pytest
import torch

from ExtremeAugLogic.errors import InputError
from ExtremeAugLogic.recipes.slice2d.recipe import Recipe2D
from ExtremeAugLogic.recipes.slice2d.views import VIEW_SETS, averaged_over_views, views_for, warp


def _centre_of_mass(t: torch.Tensor) -> np.ndarray:
    rows, cols = torch.meshgrid(torch.arange(t.shape[-2], dtype=torch.float32),
                                torch.arange(t.shape[-1], dtype=torch.float32), indexing="ij")
    mass = t[0, 0]
    return np.array([float((mass * rows).sum() / mass.sum()), float((mass * cols).sum() / mass.sum())])


def _blob(height=96, width=128):
    x = torch.zeros(1, 1, height, width)
    x[0, 0, 20:36, 30:50] = 1.0
    return x


@pytest.mark.parametrize("view", [(10.0, 1.0), (-10.0, 1.0), (0.0, 0.9), (0.0, 1.1)])
def test_a_view_rotates_and_scales_about_the_centre_with_true_proportions(view):
    x = _blob()  # not square: a rotation must still keep distances
    centre = np.array([(96 - 1) / 2, (128 - 1) / 2])
    seen = warp(x, view, inverse=True, padding="zeros")
    before, after = _centre_of_mass(x) - centre, _centre_of_mass(seen) - centre
    assert np.linalg.norm(after) == pytest.approx(view[1] * np.linalg.norm(before), rel=0.02)
    turned = np.degrees(np.arctan2(after[0], after[1]) - np.arctan2(before[0], before[1]))
    assert abs(turned) == pytest.approx(abs(view[0]), abs=0.5)
    assert float(seen.sum()) == pytest.approx(view[1] ** 2 * float(x.sum()), rel=0.03)


def test_the_way_back_returns_each_view_onto_the_slice():
    x = _blob()
    for view in VIEW_SETS["rotate-scale"]:
        back = warp(warp(x, view, inverse=True, padding="zeros"), view, inverse=False, padding="border")
        assert float((back - x).abs().mean()) < 0.005
        assert np.allclose(_centre_of_mass(back), _centre_of_mass(x), atol=0.3)


def test_averaging_a_pointwise_predictor_over_views_changes_nothing_inside_the_slice():
    """A predictor that looks at each pixel alone is unchanged by views done right; one wrong way round is not."""
    torch.manual_seed(0)
    coarse = torch.rand(2, 1, 8, 8)  # smooth at 64 px, so resampling is nearly exact
    x = torch.nn.functional.interpolate(coarse, size=(64, 64), mode="bicubic", align_corners=True)

    def predict(t):
        return torch.cat([torch.sigmoid(4 * t), 1 - torch.sigmoid(4 * t)], dim=1)

    plain = predict(x)
    averaged = averaged_over_views(predict, x, VIEW_SETS["rotate-scale"], padding="reflection")
    inner = (slice(None), slice(None), slice(12, 52), slice(12, 52))
    assert torch.allclose(averaged.sum(dim=1), torch.ones(2, 64, 64), atol=1e-5)
    assert float((averaged - plain)[inner].abs().max()) < 0.03
    wrong = (predict(warp(x, (10.0, 1.0), inverse=True, padding="zeros")) + plain) / 2  # never turned back
    assert float((wrong - plain)[inner].abs().max()) > 0.05


def test_one_view_is_the_plain_prediction():
    x = torch.rand(1, 1, 32, 32)
    assert torch.equal(averaged_over_views(lambda t: t * 2, x, VIEW_SETS["off"]), x * 2)


def test_an_unknown_set_is_refused_in_one_line():
    with pytest.raises(InputError, match="test_views must be one of off, rotate, scale, rotate-scale"):
        views_for("sideways")
    with pytest.raises(InputError, match="test_views"):
        Recipe2D({"test_views": "sideways"})
    with pytest.raises(InputError, match="at least one view"):
        averaged_over_views(lambda t: t, torch.zeros(1, 1, 8, 8), ())
    assert Recipe2D({}).settings["test_views"] == "off"
    assert Recipe2D({"preset": "paper"}).settings["test_views"] == "off"


def test_a_model_predicts_with_its_views_and_their_mean_is_the_mean_of_single_views(tiny_phantom_model):
    import SimpleITK as sitk

    from ExtremeAugLogic.inference.predict import load_model
    from ExtremeAugLogic.recipes.slice2d import preprocess

    ws, pairs = tiny_phantom_model(test_views="rotate")
    recipe, config, model, _ = load_model(ws, None, "cpu")
    assert config.settings["test_views"] == "rotate"
    image = sitk.ReadImage(str(pairs[1][0]))
    with_views = recipe.predict_probabilities(model, config, image, "cpu")
    assert with_views.shape == (config["num_classes"], *sitk.GetArrayViewFromImage(image).shape)
    assert np.allclose(with_views.sum(axis=0), 1.0, atol=1e-4)
    stack = recipe.preprocess(config, image)
    slices = recipe.input_channels(config.settings, stack.image)
    singles = [recipe.slice_probabilities(model, config, slices, "cpu", views=(v,)) for v in VIEW_SETS["rotate"]]
    assert np.allclose(preprocess.from_slices(np.mean(singles, axis=0), stack.geometry), with_views, atol=1e-5)
    plain = preprocess.from_slices(singles[0], stack.geometry)
    assert not np.allclose(plain, with_views, atol=1e-3)  # the views took part
