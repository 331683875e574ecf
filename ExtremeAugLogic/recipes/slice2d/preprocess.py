"""Preprocessing for the 2D paper model: slice axis, in-plane resampling, intensity matching.

Every step is switchable through the recipe settings:

- ``slice_axis``: "axial", "coronal", "sagittal" (anatomical, from the image direction) or
  "auto" (the acquisition plane: slice along the index axis with the largest spacing, ties
  broken by the fewest voxels). The shared spine scans are sagittal acquisitions whose axial
  slices are only 67-77 px wide; "auto" slices them sagittally.
- ``inplane_size`` (256) and ``inplane_fit``: "pad" keeps the aspect ratio (the longer side
  becomes ``inplane_size``) and pads the shorter side (``pad_mode`` "reflect" as in the MSD
  paper, or "zero"); "stretch" resizes both sides to ``inplane_size`` as the paper does.
- ``intensity``: "match" maps the scan linearly, piecewise between histogram quantiles,
  onto a template scaled to [0, 1] (the rule of SimpleITK's histogram matching, with the
  template kept as 13 landmarks in the model config); "percentile" scales
  the 0.5-99.5 percentile range to [0, 1]; "none" leaves intensities as they are.

A ``SliceStack`` remembers what was done so probabilities map back onto the scan's own grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.transforms import ScaleIntensityRangePercentiles

from ExtremeAugLogic.workspace import imageio

ANATOMICAL_AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # LPS component of the normal


def choose_slice_axis(image: sitk.Image, slice_axis: str = "auto") -> int:
    """Return the numpy axis (0, 1 or 2 of ``GetArrayFromImage``) to slice along."""
    if slice_axis == "auto":
        spacing = np.array(image.GetSpacing())  # index order x, y, z
        size = np.array(image.GetSize())
        order = sorted(range(3), key=lambda j: (-round(spacing[j], 3), size[j]))
        index_axis = order[0]
    elif slice_axis in ANATOMICAL_AXES:
        direction = np.array(image.GetDirection()).reshape(3, 3)
        component = ANATOMICAL_AXES[slice_axis]
        index_axis = int(np.argmax(np.abs(direction[component, :])))
    else:
        raise ValueError(f"slice_axis must be auto, axial, coronal or sagittal, not {slice_axis!r}")
    return 2 - index_axis


def scale_to_unit(array: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Scale the [low, high] percentile range of ``array`` to [0, 1] (clipped), with MONAI's transform.

    A scan whose two percentiles coincide (a constant image) becomes all zeros, where the
    transform alone would only shift it.
    """
    lo, hi = np.percentile(array, [low, high])
    if hi <= lo:
        return np.zeros_like(array, dtype=np.float32)
    scale = ScaleIntensityRangePercentiles(low, high, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32)
    return np.asarray(scale(np.asarray(array, dtype=np.float32)), dtype=np.float32)


MATCH_QUANTILES = (1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 99)


def _landmarks(array: np.ndarray) -> list[float]:
    """Intensity quantiles of the voxels above the mean (the body, not the air around it)."""
    body = array[array > array.mean()]
    body = body if body.size else array.ravel()
    return [float(v) for v in np.percentile(body, MATCH_QUANTILES)]


def make_template(image: sitk.Image) -> list[float]:
    """The intensity template: landmarks of ``image`` after scaling it to [0, 1].

    Stored in the model's JSON config, so matching needs no template image at predict time.
    """
    return _landmarks(scale_to_unit(sitk.GetArrayFromImage(image).astype(np.float32)))


def match_intensity(array: np.ndarray, template: list[float]) -> np.ndarray:
    """Map ``array`` onto the template piecewise linearly between matching quantiles.

    The same rule as SimpleITK's HistogramMatchingImageFilter with its threshold at the mean
    intensity; below the first and above the last landmark the end segments extend linearly.
    """
    source = np.array(_landmarks(array), dtype=np.float64)
    target = np.array(template, dtype=np.float64)
    keep = np.concatenate([[True], np.diff(source) > 1e-6])  # strictly increasing points
    source, target = source[keep], target[keep]
    if source.size < 2:
        return scale_to_unit(array)
    out = np.interp(array, source, target)
    low_slope = (target[1] - target[0]) / (source[1] - source[0])
    high_slope = (target[-1] - target[-2]) / (source[-1] - source[-2])
    out = np.where(array < source[0], target[0] + (array - source[0]) * low_slope, out)
    out = np.where(array > source[-1], target[-1] + (array - source[-1]) * high_slope, out)
    return np.clip(out, 0.0, 1.5).astype(np.float32)


def normalise_intensity(image: sitk.Image, mode: str, template: list[float] | None) -> np.ndarray:
    """Return the scan's voxels as float32 on a [0, 1]-like scale according to ``mode``."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    if mode == "none":
        return array
    if mode == "percentile" or template is None:
        return scale_to_unit(array)
    if mode != "match":
        raise ValueError(f"intensity must be match, percentile or none, not {mode!r}")
    return match_intensity(array, template)


@dataclass
class SliceGeometry:
    """How a volume was turned into square slices, so the mapping can be inverted."""

    axis: int               # numpy axis sliced along
    original_hw: tuple      # in-plane (rows, cols) of the scan
    resized_hw: tuple       # (rows, cols) after resampling
    pad: tuple              # ((top, bottom), (left, right)) added after resampling
    size: int               # side of the square slices


def plan_slices(shape: tuple, spacing_zyx: tuple, axis: int, size: int, fit: str) -> SliceGeometry:
    """Plan in-plane resampling of the slices of a volume of ``shape`` (numpy order)."""
    inplane = [a for a in range(3) if a != axis]
    rows, cols = shape[inplane[0]], shape[inplane[1]]
    if fit == "stretch":
        return SliceGeometry(axis, (rows, cols), (size, size), ((0, 0), (0, 0)), size)
    if fit != "pad":
        raise ValueError(f"inplane_fit must be pad or stretch, not {fit!r}")
    height_mm, width_mm = rows * spacing_zyx[inplane[0]], cols * spacing_zyx[inplane[1]]
    scale = size / max(height_mm, width_mm)
    new_rows = max(1, min(size, int(round(height_mm * scale))))
    new_cols = max(1, min(size, int(round(width_mm * scale))))
    pad_r, pad_c = size - new_rows, size - new_cols
    pad = ((pad_r // 2, pad_r - pad_r // 2), (pad_c // 2, pad_c - pad_c // 2))
    return SliceGeometry(axis, (rows, cols), (new_rows, new_cols), pad, size)


def to_slices(volume: np.ndarray, geometry: SliceGeometry, is_label: bool = False,
              pad_mode: str = "reflect") -> np.ndarray:
    """Volume (numpy order) -> (S, size, size) stack of resampled, padded slices."""

    stack = np.moveaxis(volume, geometry.axis, 0)
    tensor = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))[:, None]
    if tuple(stack.shape[1:]) != tuple(geometry.resized_hw):
        mode = "nearest-exact" if is_label else "bilinear"
        kwargs = {} if is_label else {"align_corners": False}
        tensor = F.interpolate(tensor, size=geometry.resized_hw, mode=mode, **kwargs)
    (top, bottom), (left, right) = geometry.pad
    if top or bottom or left or right:
        tensor = _pad(tensor, (left, right, top, bottom), "zero" if is_label else pad_mode)
    out = tensor[:, 0].numpy()
    return out.astype(np.uint8) if is_label else out.astype(np.float32)


def _pad(tensor, pad: tuple, mode: str):
    """Pad (N, 1, H, W) by reflection (repeated while the pad exceeds the side) or zeros."""

    if mode == "zero":
        return F.pad(tensor, pad)
    if mode != "reflect":
        raise ValueError(f"pad_mode must be reflect or zero, not {mode!r}")
    left, right, top, bottom = pad
    while left or right or top or bottom:
        h, w = tensor.shape[-2:]
        step = (min(left, w - 1), min(right, w - 1), min(top, h - 1), min(bottom, h - 1))
        if max(step) <= 0:  # a side of one pixel cannot be reflected
            return F.pad(tensor, (left, right, top, bottom), mode="replicate")
        tensor = F.pad(tensor, step, mode="reflect")
        left, right, top, bottom = (a - b for a, b in zip((left, right, top, bottom), step))
    return tensor


def from_slices(probabilities: np.ndarray, geometry: SliceGeometry) -> np.ndarray:
    """(C, S, size, size) slice probabilities -> (C, *volume shape) on the scan's grid."""

    (top, bottom), (left, right) = geometry.pad
    rows, cols = geometry.resized_hw
    cropped = probabilities[:, :, top:top + rows, left:left + cols]
    channels, slices = cropped.shape[:2]
    tensor = torch.from_numpy(np.ascontiguousarray(cropped, dtype=np.float32))
    tensor = tensor.reshape(channels * slices, 1, rows, cols)
    if (rows, cols) != tuple(geometry.original_hw):
        tensor = F.interpolate(tensor, size=geometry.original_hw, mode="bilinear", align_corners=False)
    out = tensor.reshape(channels, slices, *geometry.original_hw).numpy()
    return np.moveaxis(out, 1, geometry.axis + 1)


def with_neighbours(slices: np.ndarray, count: int, step: int) -> np.ndarray:
    """(S, H, W) slices -> (S, 2 * count + 1, H, W): each slice with ``count`` neighbours on
    each side, ``step`` slices apart, in order (edge slices repeat at the ends of the scan).

    ``count`` 0 gives (S, 1, H, W): plain 2D input.
    """
    offsets = np.arange(-count, count + 1) * max(int(step), 1)
    index = np.clip(np.arange(len(slices))[:, None] + offsets[None], 0, len(slices) - 1)
    return slices[index]


@dataclass
class SliceStack:
    """A preprocessed scan: square slices of intensities (and labels) plus the geometry."""

    images: np.ndarray            # (S, size, size) float32
    labels: np.ndarray | None     # (S, size, size) uint8
    geometry: SliceGeometry


def preprocess_case(image: sitk.Image, label: sitk.Image | None, settings: dict,
                    template: list[float] | None) -> SliceStack:
    """Apply the switchable preprocessing of ``settings`` to one scan (and its label)."""
    axis = choose_slice_axis(image, settings.get("slice_axis", "auto"))
    spacing_zyx = imageio.case_spacing_zyx(image)
    volume = normalise_intensity(image, settings.get("intensity", "match"), template)
    geometry = plan_slices(volume.shape, spacing_zyx, axis, int(settings.get("inplane_size", 256)),
                           settings.get("inplane_fit", "pad"))
    images = to_slices(volume, geometry, pad_mode=settings.get("pad_mode", "reflect"))
    labels = None
    if label is not None:
        labels = to_slices(sitk.GetArrayFromImage(label), geometry, is_label=True)
    return SliceStack(images, labels, geometry)
