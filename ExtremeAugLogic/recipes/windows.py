"""Sliding-window prediction with flip test-time augmentation, for 2D and 3D alike.

MONAI's ``sliding_window_inference`` places the windows and blends them with Gaussian
weights; this module adds what both recipes need around it: logits to probabilities, one
flip per spatial axis when TTA is on (averaged with the plain prediction), the device's
mixed-precision policy (``devices.autocast``) and a progress count of windows.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from monai.inferers import sliding_window_inference

from ExtremeAugLogic.devices import autocast


def logits_to_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over channels; a single channel is a sigmoid, returned as (1 - p, p)."""
    logits = logits.float()
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def flip_sets(spatial_dims: int, tta: bool) -> list[tuple]:
    """The tensor dims to flip per pass: none, then (with TTA) each spatial axis on its own."""
    return [()] + ([(2 + axis,) for axis in range(spatial_dims)] if tta else [])


def count_windows(size: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """How many windows ``sliding_window_inference`` evaluates on one image of ``size``.

    Asked of MONAI itself (a dry run with a counting predictor on a zero image), so the
    count follows MONAI's placement rule rather than a copy of it.
    """
    seen = [0]

    def counting(t):
        seen[0] += t.shape[0]
        return t

    sliding_window_inference(torch.zeros((1, 1, *size)), tuple(int(r) for r in roi), 64, counting,
                             overlap=overlap, mode="constant")
    return seen[0]


@torch.no_grad()
def window_probabilities(model, x: torch.Tensor, roi: Sequence[int], device, overlap: float = 0.5,
                         tta: bool = False, sw_batch_size: int = 8,
                         progress: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Class probabilities (N, K+1, *spatial) for the batch ``x`` (N, C, *spatial) on ``device``."""
    roi = tuple(int(r) for r in roi)
    flips = flip_sets(x.ndim - 2, tta)
    total = count_windows(x.shape[2:], roi, overlap) * x.shape[0] * len(flips) if progress else 0
    done = [0]

    def predictor(t):
        with autocast(device):
            out = logits_to_probabilities(model(t))
        if progress:
            done[0] += t.shape[0]
            progress(min(done[0], total), total)
        return out

    model.eval()
    summed = None
    for dims in flips:
        source = x.flip(dims) if dims else x
        p = sliding_window_inference(source, roi, sw_batch_size, predictor, overlap=overlap, mode="gaussian")
        p = p.flip(dims) if dims else p
        summed = p if summed is None else summed + p
    return (summed / len(flips)).float()
