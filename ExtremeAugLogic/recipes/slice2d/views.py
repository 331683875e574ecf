"""Test-time views: each slice also predicted rotated or scaled, the probabilities turned back and averaged.

A view is (angle in degrees, scale) about the slice centre, within the ranges the training
augmentation draws from, so every view shows the network anatomy of the kind it learnt on. The
view's probabilities are warped back onto the slice (beyond the view's edge the nearest
predicted value stands in) and all views count the same, so the average is linear and a mean
of single-view predictions equals the prediction with all of them.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ExtremeAugLogic.errors import InputError

View = tuple[float, float]
IDENTITY: View = (0.0, 1.0)

# Fixed sets, named so a model's config records which one it predicts with.
VIEW_SETS: dict[str, tuple[View, ...]] = {
    "off": (IDENTITY,),
    "rotate": (IDENTITY, (10.0, 1.0), (-10.0, 1.0)),
    "scale": (IDENTITY, (0.0, 0.9), (0.0, 1.1)),
    "rotate-scale": (IDENTITY, (10.0, 1.0), (-10.0, 1.0), (0.0, 0.9), (0.0, 1.1)),
}


def views_for(name: str) -> tuple[View, ...]:
    """The views of a named set; one line for an unknown name."""
    if name not in VIEW_SETS:
        raise InputError(f"test_views must be one of {', '.join(VIEW_SETS)}, not {name!r}")
    return VIEW_SETS[name]


def _theta(view: View, height: int, width: int, inverse: bool, like: torch.Tensor) -> torch.Tensor:
    """``affine_grid`` matrix (1, 2, 3) of the view (or of its inverse), in pixel-true proportions.

    The view shows ``V(p) = I(A^-1 p)`` with ``A`` the rotation by the angle and the scale about the
    centre; ``affine_grid`` maps output to input coordinates, so the view samples with ``A^-1`` and
    the way back with ``A``. Normalised coordinates are rescaled so a rotation stays a rotation on
    a slice that is not square.
    """
    angle, scale = math.radians(view[0]), float(view[1])
    cos, sin = math.cos(angle), math.sin(angle)
    if inverse:  # A^-1 = R(-angle) / scale
        a = torch.tensor([[cos, sin], [-sin, cos]], dtype=torch.float64) / scale
    else:
        a = torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64) * scale
    half = torch.tensor([width / 2.0, height / 2.0], dtype=torch.float64)  # (x, y) as affine_grid orders them
    a = a * half[None, :] / half[:, None]  # D^-1 A D with D = diag(half)
    theta = torch.cat([a, torch.zeros((2, 1), dtype=torch.float64)], dim=1)
    return theta[None].to(device=like.device, dtype=torch.float32)


def warp(x: torch.Tensor, view: View, inverse: bool, padding: str) -> torch.Tensor:
    """(N, C, H, W) resampled bilinearly through the view (``inverse``: back from it)."""
    if view == IDENTITY:
        return x
    n, c, h, w = x.shape
    grid = F.affine_grid(_theta(view, h, w, inverse, x).expand(n, 2, 3), [n, c, h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def averaged_over_views(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                        views: Sequence[View], padding: str = "zeros") -> torch.Tensor:
    """The mean over ``views`` of ``predict`` (N, C, H, W) -> (N, K, H, W) on the slices seen through each.

    ``padding`` fills the image beyond the slice in a view as the training patches were filled
    ("zeros" or "reflection"); probabilities come back with the nearest value at the view's edge.
    """
    if not views:
        raise InputError("test_views: at least one view is needed")
    image_padding = "zeros" if padding == "zeros" else "reflection"
    summed = None
    for view in views:
        p = warp(predict(warp(x, view, inverse=True, padding=image_padding)), view, inverse=False, padding="border")
        summed = p if summed is None else summed + p
    return summed / len(views)
