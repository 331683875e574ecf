"""Fingerprint of the training cases and the MSD 2018 auto-configuration rules (3D model).

All axes are in numpy array order (z, y, x), as ``SimpleITK.GetArrayFromImage`` returns them.

Fingerprint
    ``spacing``: the per-axis median of the cases' spacings (the training grid);
    ``shape``: the per-axis median of the case shapes after resampling to that spacing.

Configuration (``configure``)
    - Depth per axis: d_i = the largest d <= ``max_depth`` (4) with shape_i / 2**d >= 8, i.e.
      an axis is down-sampled only while another level keeps it at 8 voxels or more. The
      network depth is D = max_i d_i, but at least 2 (MONAI's DynUNet minimum); on a scan that
      small the longest axis gets the missing level(s).
    - Level l (1..D) down-samples axis i with stride 2 when l <= d_i, otherwise stride 1; the
      convolutions of level l (0..D) use kernel 3 along axis i when l <= d_i, otherwise 1
      (hence anisotropic kernels such as (1, 3, 3) for thick-slice scans).
    - Through-plane axis: the one with the largest spacing; for isotropic spacing (within 1 %)
      the one with the fewest voxels.
    - Patch: min(2**(3 + d_i), 256) in-plane and min(2**(3 + d_i), 128) through-plane, then
      reduced to the memory budget: while the estimated activation memory (``memory_bytes``)
      exceeds the budget, or on CPU while the patch has more than ``cpu_max_voxels`` voxels
      (96**3: a 2-core CPU must still train in reasonable time), the largest axis is halved.
      Patches stay powers of two >= max(2**d_i, 8) along each axis, so they stay divisible by
      the axis' total stride 2**d_i. A patch larger than a scan is filled by reflection.
    - Budget: ``memory_budget_mb`` when given; on CUDA 80 % of the free memory
      (``torch.cuda.mem_get_info``); on CPU 25 % of the available RAM (psutil, else
      /proc/meminfo).
"""

from __future__ import annotations

import numpy as np

MIN_SIZE = 8                     # voxels an axis keeps at the deepest level it is down-sampled to
INPLANE_CAP, THROUGH_CAP = 256, 128
CPU_MAX_VOXELS = 96 ** 3
BYTES_PER_VALUE = 4              # float32 activations
# Tensors of (features x voxels) kept per level for the backward pass: the encoder's residual
# block (2 convs, 2 norms, activations, the residual branch, the sum) and the decoder's
# transposed conv, concatenation (2x) and residual block, plus the gradients of the largest
# of them during backward. Checked against the peak RSS of CPU training steps (batch 2):
# 64^3 312 MB measured / 383 MB estimated, 128x64x64 610 / 774, 16x96x96 226 / 233.
ACTIVATION_FACTOR = 24


def resampled_shape(shape, spacing, target_spacing) -> tuple:
    """Voxels per axis covering the same extent at ``target_spacing`` (at least 1)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing))


def fingerprint(shapes: list, spacings: list) -> dict:
    """Median spacing and the median shape after resampling every case to it."""
    spacing = tuple(float(v) for v in np.median(np.asarray(spacings, dtype=float), axis=0))
    resampled = [resampled_shape(sh, sp, spacing) for sh, sp in zip(shapes, spacings)]
    shape = tuple(int(round(v)) for v in np.median(np.asarray(resampled, dtype=float), axis=0))
    return {"spacing": list(spacing), "shape": list(shape)}


def axis_depths(shape, max_depth: int = 4, min_size: int = MIN_SIZE) -> list:
    """d_i: the most halvings (<= max_depth) that keep axis i at ``min_size`` voxels or more."""
    depths = []
    for n in shape:
        d = 0
        while d < max_depth and n / 2 ** (d + 1) >= min_size:
            d += 1
        depths.append(d)
    if max(depths) < 2:  # DynUNet needs two levels: give them to the longest axis
        longest = int(np.argmax(shape))
        depths[longest] = 2
    return depths


def through_plane_axis(spacing, shape) -> int:
    """The axis with the largest spacing, or with the fewest voxels when spacing is isotropic."""
    spacing = np.asarray(spacing, dtype=float)
    if spacing.max() <= spacing.min() * 1.01:
        return int(np.argmin(shape))
    return int(np.argmax(spacing))


def strides_and_kernels(depths) -> tuple:
    """Per-level strides (level 0 first, all 1) and kernels for per-axis depths ``depths``."""
    depth = max(depths)
    strides = [[1, 1, 1]] + [[2 if level <= d else 1 for d in depths] for level in range(1, depth + 1)]
    kernels = [[3 if level <= d else 1 for d in depths] for level in range(depth + 1)]
    return strides, kernels


def feature_counts(depth: int, base: int = 6, maximum: int = 320) -> list:
    """Features per level: ``base`` doubling per level, capped at ``maximum``."""
    return [min(base * 2 ** level, maximum) for level in range(depth + 1)]


def initial_patch(depths, through_axis: int) -> list:
    """min(2**(3 + d_i), 256) in-plane and min(2**(3 + d_i), 128) through-plane."""
    return [min(2 ** (3 + d), THROUGH_CAP if axis == through_axis else INPLANE_CAP)
            for axis, d in enumerate(depths)]


def memory_bytes(patch, strides, features, batch_size: int) -> float:
    """Activation memory of one training step: sum over levels of features x voxels x 4 bytes
    x ``ACTIVATION_FACTOR`` (tensors kept for backward), times the batch size."""
    voxels = float(np.prod(patch))
    total = 0.0
    for level, f in enumerate(features):
        voxels /= float(np.prod(strides[level]))
        total += f * voxels
    return total * BYTES_PER_VALUE * ACTIVATION_FACTOR * batch_size


def available_ram_bytes() -> float:
    """Available RAM from psutil, else /proc/meminfo, else 4 GiB."""
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil is optional
        pass
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024.0
    except OSError:
        pass
    return 4.0 * 2 ** 30


def memory_budget_bytes(device_type: str, budget_mb=None) -> float:
    """The activation budget: explicit MB, else 80 % of free CUDA memory or 25 % of free RAM."""
    if budget_mb is not None:
        return float(budget_mb) * 2 ** 20
    if device_type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info()
        return 0.8 * float(free)
    return 0.25 * available_ram_bytes()


def reduce_patch(patch, depths, strides, features, batch_size: int, budget_bytes: float,
                 max_voxels=None) -> list:
    """Halve the largest axis (ties: the first) until the patch fits; see the module doc."""
    patch = list(patch)
    floors = [max(2 ** d, MIN_SIZE) for d in depths]

    def too_big(p):
        over_voxels = max_voxels is not None and float(np.prod(p)) > max_voxels
        return over_voxels or memory_bytes(p, strides, features, batch_size) > budget_bytes

    while too_big(patch):
        candidates = [i for i in range(len(patch)) if patch[i] // 2 >= floors[i]]
        if not candidates:
            break  # the smallest patch the network allows; train anyway
        axis = max(candidates, key=lambda i: (patch[i], -i))
        patch[axis] //= 2
    return patch


def configure(shapes: list, spacings: list, num_classes: int, settings: dict,
              device_type: str = "cpu") -> dict:
    """The JSON network/preprocessing config for cases of ``shapes`` and ``spacings`` (z, y, x)."""
    fp = fingerprint(shapes, spacings)
    max_depth = int(settings.get("max_depth", 4))
    depths = axis_depths(fp["shape"], max_depth)
    strides, kernels = strides_and_kernels(depths)
    features = feature_counts(max(depths), int(settings.get("base_features", 6)),
                              int(settings.get("max_features", 320)))
    through = through_plane_axis(fp["spacing"], fp["shape"])
    batch_size = settings.get("batch_size")
    if batch_size is None:
        batch_size = 4 if device_type == "cuda" else 2
    budget = memory_budget_bytes(device_type, settings.get("memory_budget_mb"))
    max_voxels = settings.get("cpu_max_voxels", CPU_MAX_VOXELS) if device_type == "cpu" else None
    full = initial_patch(depths, through)
    if settings.get("patch_size"):
        full = [int(v) for v in settings["patch_size"]]
        check_patch(full, depths)
        patch = list(full)
    else:
        patch = reduce_patch(full, depths, strides, features, int(batch_size), budget, max_voxels)
    return {
        "spacing": fp["spacing"], "median_shape": fp["shape"], "num_classes": int(num_classes),
        "axis_depths": depths, "depth": max(depths), "through_plane_axis": through,
        "strides": strides, "kernels": kernels, "filters": features,
        "patch_size_full": full, "patch_size": patch, "batch_size": int(batch_size),
        "device_type": device_type, "memory_budget_mb": round(budget / 2 ** 20, 1),
        "estimated_memory_mb": round(memory_bytes(patch, strides, features, int(batch_size)) / 2 ** 20, 1),
    }


def check_patch(patch, depths) -> None:
    """A user-given patch must be divisible by each axis' total stride 2**d_i."""
    for n, d in zip(patch, depths):
        if n % 2 ** d or n < 2 ** d:
            raise ValueError(f"patch_size {patch} must be divisible by {[2 ** d for d in depths]}")


def deep_supervision_weights(depth: int, enabled: bool = True) -> list:
    """Loss weights of the full-resolution output and the depth - 1 auxiliary outputs:
    halving per level, normalised to sum 1."""
    count = depth if enabled else 1
    weights = [0.5 ** i for i in range(count)]
    total = sum(weights)
    return [w / total for w in weights]
