"""The MSD 2018 3D residual encoder-decoder, built on MONAI's DynUNet.

Residual blocks (conv -> instance norm -> leaky ReLU, twice, plus a 1x1x1 projection when
the shape changes), per-level anisotropic strides and kernels from ``fingerprint3d``,
U-Net skip connections, 6 base features doubling per level, and deep supervision: in train
mode the model returns a list ``[full resolution, 1/2, 1/4, ...]`` of depth logits tensors,
each at its own resolution (the loss down-samples the target to each; cheaper than
up-sampling the heads as DynUNet's own forward does). In eval mode it returns the
full-resolution logits (B, K+1, z, y, x).
"""

from __future__ import annotations

import torch
from monai.networks.nets import DynUNet


class ResEnc3D(DynUNet):
    """DynUNet(res_block=True) whose deep-supervision heads keep their own resolution."""

    def __init__(self, out_channels: int, strides, kernels, filters, deep_supervision: bool = True):
        depth = len(strides) - 1
        super().__init__(
            spatial_dims=3, in_channels=1, out_channels=out_channels,
            kernel_size=[list(k) for k in kernels], strides=[list(s) for s in strides],
            upsample_kernel_size=[list(s) for s in strides[1:]], filters=list(filters),
            norm_name=("INSTANCE", {"affine": True}),
            act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
            deep_supervision=deep_supervision and depth >= 2, deep_supr_num=max(1, depth - 1),
            res_block=True)

    def forward(self, x: torch.Tensor):
        out = self.output_block(self.skip_layers(x))
        if self.training and self.deep_supervision:
            return [out] + list(self.heads)
        return out


def build_resenc3d(config: dict) -> ResEnc3D:
    """The network described by a ``fingerprint3d.configure`` config."""
    return ResEnc3D(int(config["num_classes"]), config["strides"], config["kernels"],
                    config["filters"], bool(config.get("deep_supervision", True)))
