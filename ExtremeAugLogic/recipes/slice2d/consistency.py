"""Weak-to-strong consistency on the worklist's slices (the FixMatch family), opt-in.

Each training step also takes a batch of worklist slices. The network's prediction on a slice as
it is (the weak view, no gradient) labels every pixel it is sure of (top probability >=
``consistency_threshold``); the same slice moved and recoloured by the training's own spatial and
intensity augmentation (the strong view) must predict those labels. Unsure pixels, and pixels
the move brings in from outside the slice, count for nothing. ``training.trainer`` adds the term
to the labelled loss, times ``consistency_weight``, from ``consistency_from`` of the budget on
(``unlabeled=consistency``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ExtremeAugLogic.recipes.base import stream_seed
from ExtremeAugLogic.recipes.slice2d.augment import (AugmentationRanges, IntensityRanges, augment_intensity,
                                                     bend_grid, image_padding_mode, sample_patches, sampling_grid,
                                                     transform_parameters)


class WeakToStrong:
    """The consistency term on (S, C, H, W) worklist slices held on the training device."""

    def __init__(self, slices: torch.Tensor, ranges: AugmentationRanges, intensity: IntensityRanges,
                 patch: int, batch_size: int, threshold: float, seed: int = 0, padding: str = "zeros",
                 rank: int = 0):
        self.slices, self.ranges, self.intensity = slices, ranges, intensity
        self.patch, self.batch_size, self.threshold = int(patch), int(batch_size), float(threshold)
        self.padding = image_padding_mode(padding)  # the images' padding: the labels come from the weak view
        self.generator = torch.Generator(device=slices.device)
        self.generator.manual_seed(stream_seed(seed + 7919, rank))  # its own stream: the labelled draws stay as they were
        self.confident_shares: list[float] = []  # per step: the share of weak-view pixels sure enough to teach

    def weak_views(self) -> torch.Tensor:
        """A batch of worklist patches as they are (whole slices when the patch is the slice)."""
        count, size, device = self.batch_size, self.slices.shape[-1], self.slices.device
        ids = torch.randint(len(self.slices), (count,), device=device, generator=self.generator)
        half = self.patch // 2
        if self.patch >= size:
            centres = torch.full((count, 2), size // 2, device=device, dtype=torch.long)
        else:
            centres = torch.randint(half, size - self.patch + half + 1, (count, 2), device=device,
                                    generator=self.generator)
        params = {"angle": torch.zeros(count, device=device), "scale": torch.ones(count, device=device),
                  "shift": torch.zeros(count, 2, device=device)}
        x, _ = sample_patches(self.slices, None, ids, sampling_grid(centres, params, self.patch, size), self.padding)
        return x

    def strong_views(self, weak: torch.Tensor, target: torch.Tensor, sure: torch.Tensor):
        """The weak views, their labels and their sure-pixel mask under one fresh random transform
        each, then the images' intensity changes; pixels from outside the patch are not sure."""
        count, device = len(weak), weak.device
        params = transform_parameters(self.ranges, count, device, generator=self.generator)
        centres = torch.full((count, 2), self.patch // 2, device=device, dtype=torch.long)
        grid = sampling_grid(centres, params, self.patch, self.patch)
        if self.ranges.elastic_px > 0:
            grid = bend_grid(grid, self.ranges.elastic_px, self.patch, self.generator)
        x = F.grid_sample(weak, grid, mode="bilinear", padding_mode=self.padding, align_corners=False)
        packed = torch.stack([target.float(), sure.float()], dim=1)
        moved = F.grid_sample(packed, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        return augment_intensity(x, self.intensity, self.generator), moved[:, 0].round().long(), moved[:, 1]

    def views(self, teacher) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(strong views, their labels, their sure-pixel mask) for one step; ``teacher`` (the
        network being trained, unwrapped) labels the weak views without a gradient."""
        weak = self.weak_views()
        with torch.no_grad():
            logits = teacher(weak)
            if logits.shape[1] == 1:  # one structure: a sigmoid channel
                p = torch.sigmoid(logits[:, 0].float())
                target, top = (p >= 0.5).long(), torch.maximum(p, 1 - p)
            else:
                top, target = torch.softmax(logits.float(), dim=1).max(dim=1)
            sure = top >= self.threshold
        self.confident_shares.append(float(sure.float().mean()))
        return self.strong_views(weak, target, sure)

    @staticmethod
    def loss(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The strong views' masked loss (cross-entropy, or binary for one sigmoid channel), a mean
        over every pixel, so a batch with few sure pixels weighs little."""
        if out.shape[1] == 1:
            per_pixel = F.binary_cross_entropy_with_logits(out[:, 0].float(), target.float(), reduction="none")
        else:
            per_pixel = F.cross_entropy(out.float(), target, reduction="none")
        return (per_pixel * mask).sum() / mask.numel()
