"""The extreme-augmentation paper's 2D residual U-Net, assembled from MONAI blocks.

A stem convolution, ``depth`` (5) residual down-sampling stages with filters doubling
(capped at ``max_features``), a central residual stage, ``depth`` residual up-sampling stages
with U-Net skip connections (concatenation), 3x3 convolutions, ReLU, one input channel (more
for 2.5D input: the slice and its neighbours).
The head gives one logit for a single structure (sigmoid) or K+1 logits (softmax).
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn


def stage_features(base: int, depth: int, max_features: int) -> list[int]:
    """Filters per resolution level, doubling from ``base``: level 0 (stem) .. level ``depth``."""
    return [min(base * 2 ** level, max_features) for level in range(depth + 1)]


class ResUNet2D(nn.Module):
    """Residual U-Net for (B, in_channels, H, W) inputs with H and W divisible by 2**depth."""

    def __init__(self, out_channels: int, base_features: int = 16, depth: int = 5,
                 max_features: int = 256, norm: str = "INSTANCE", in_channels: int = 1, dropout: float = 0.0):
        super().__init__()
        feats = stage_features(base_features, depth, max_features)
        block = dict(spatial_dims=2, kernel_size=3, act="RELU", norm=norm, dropout=dropout or None)
        self.depth = depth
        self.stem = ResidualUnit(in_channels=in_channels, out_channels=feats[0], strides=1, **block)
        self.down = nn.ModuleList(
            ResidualUnit(in_channels=feats[i], out_channels=feats[i + 1], strides=2, **block)
            for i in range(depth))
        self.centre = ResidualUnit(in_channels=feats[-1], out_channels=feats[-1], strides=1, **block)
        self.upsample = nn.ModuleList(
            Convolution(in_channels=feats[i + 1], out_channels=feats[i], strides=2,
                        is_transposed=True, **block)
            for i in reversed(range(depth)))
        self.up = nn.ModuleList(
            ResidualUnit(in_channels=2 * feats[i], out_channels=feats[i], strides=1, **block)
            for i in reversed(range(depth)))
        self.head = nn.Conv2d(feats[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for stage in self.down:
            skips.append(stage(skips[-1]))
        x = self.centre(skips.pop())
        for upsample, stage in zip(self.upsample, self.up):
            x = stage(torch.cat([upsample(x), skips.pop()], dim=1))
        return self.head(x)
