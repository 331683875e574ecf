"""Segmentation quality: Dice per structure and overall, HD95 in mm, changed voxels.

Inputs are label maps as numpy arrays or SimpleITK images (both on the same grid).
Conventions, chosen so that no score is ever NaN:

- Dice of one structure: 1.0 when it is absent from both maps, 0.0 when it is absent
  from exactly one.
- ``mean_dice``: the mean over the structures present in the reference (a structure that
  only the prediction has lowers ``binary_dice``, not ``mean_dice``).
- HD95 (mm): the symmetric 95th-percentile Hausdorff distance between the two surfaces
  (the larger of the two directed 95th percentiles), computed by MONAI's
  ``compute_hausdorff_distance(percentile=95)`` with the voxel spacing per axis. 0.0 when the structure is absent from both maps, ``None`` when it
  is absent from exactly one (the distance is undefined; JSON-safe, unlike ``inf``).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from monai.metrics import compute_hausdorff_distance

from ExtremeAugLogic.errors import InputError
from ExtremeAugLogic.workspace import overlap
from ExtremeAugLogic.workspace.imageio import case_spacing_zyx, grid_difference, read_label

# ---------------------------------------------------------------- Dice

def dice_scores(prediction, reference, labels: Optional[Sequence[int]] = None) -> dict:
    """Dice per structure and overall.

    Returns ``{"per_structure": {label: dice}, "mean_dice": float, "binary_dice": float}``.
    ``labels`` defaults to every non-zero value in either map; ``binary_dice`` merges
    those labels into one foreground. Computed by ``workspace.overlap.dice_scores``.
    """
    pred, ref = _pair(prediction, reference)
    return overlap.dice_scores(pred, ref, _labels(pred, ref, labels))


# ---------------------------------------------------------------- HD95

def hausdorff95(prediction, reference, spacing: Optional[Sequence[float]] = None,
                labels: Optional[Sequence[int]] = None) -> dict:
    """HD95 in mm per structure: ``{label: float | None}``.

    ``spacing`` is in numpy axis order (the reverse of SimpleITK's ``GetSpacing()``);
    when omitted it is taken from ``reference`` (or ``prediction``) if that is a SimpleITK
    image, else 1 mm. See the module docstring for empty structures.
    """
    spacing = _spacing(spacing, reference, prediction)
    pred, ref = _pair(prediction, reference)
    return {label: _hd95(pred == label, ref == label, spacing)
            for label in _labels(pred, ref, labels)}


def _hd95(a: np.ndarray, b: np.ndarray, spacing: tuple) -> Optional[float]:
    """Symmetric 95th-percentile surface distance of two boolean masks (mm), by MONAI."""
    has_a, has_b = bool(a.any()), bool(b.any())
    if not has_a and not has_b:
        return 0.0
    if has_a != has_b:
        return None
    box = _bounding_box(a | b)
    a = torch.from_numpy(np.ascontiguousarray(a[box]))[None, None]
    b = torch.from_numpy(np.ascontiguousarray(b[box]))[None, None]
    with warnings.catch_warnings():  # MONAI 1.6 warns about its own internal call
        warnings.simplefilter("ignore", FutureWarning)
        distance = compute_hausdorff_distance(a, b, include_background=True, percentile=95, spacing=list(spacing))
    return float(distance.item())


def _bounding_box(mask: np.ndarray, margin: int = 1) -> tuple:
    """Slices around the non-zero voxels of ``mask``, ``margin`` voxels wider."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        box.append(slice(max(hits[0] - margin, 0), min(hits[-1] + margin + 1, mask.shape[axis])))
    return tuple(box)


def _spacing(spacing, *images) -> tuple:
    """Spacing in numpy order: given, from the first SimpleITK image, or 1 mm."""
    if spacing is not None:
        values = tuple(float(s) for s in spacing)
        if not all(math.isfinite(s) and s > 0 for s in values):
            raise InputError(f"spacing: need positive values in mm, got {values}")
        return values
    for image in images:
        if isinstance(image, sitk.Image):
            return case_spacing_zyx(image)
    return (1.0,) * np.ndim(_array(images[0], "reference"))


# ---------------------------------------------------------------- files

def evaluate_files(prediction_path: str | os.PathLike, reference_path: str | os.PathLike,
                   labels: Optional[Sequence[int]] = None) -> dict:
    """Compare two label files on the same grid.

    Returns ``{"per_structure": {label: {"dice", "hd95_mm"}}, "mean_dice", "binary_dice",
    "mean_hd95_mm"}``; ``mean_hd95_mm`` is the mean over the reference's structures whose
    HD95 is defined (``None`` if there is none). Raises InputError for unreadable files,
    invalid label maps or different grids.
    """
    reference = read_label(reference_path, allow_empty=True)
    prediction = read_label(prediction_path, reference=reference,
                            reference_name=str(reference_path), allow_empty=True)
    return evaluate(prediction, reference, labels)


def evaluate(prediction, reference, labels: Optional[Sequence[int]] = None,
             spacing: Optional[Sequence[float]] = None) -> dict:
    """In-memory :func:`evaluate_files` (spacing as in :func:`hausdorff95`)."""
    dice = dice_scores(prediction, reference, labels)
    hd95 = hausdorff95(prediction, reference, spacing, list(dice["per_structure"]))
    ref = _array(reference, "reference")
    present = [label for label in hd95 if np.any(ref == label) and hd95[label] is not None]
    return {
        "per_structure": {label: {"dice": dice["per_structure"][label], "hd95_mm": hd95[label]}
                          for label in dice["per_structure"]},
        "mean_dice": dice["mean_dice"],
        "binary_dice": dice["binary_dice"],
        "mean_hd95_mm": float(np.mean([hd95[k] for k in present])) if present else None,
    }


# ---------------------------------------------------------------- report, edits

def format_report(result: dict, names: Optional[dict] = None) -> str:
    """A readable table of an :func:`evaluate` (or :func:`dice_scores`) result."""
    names = names or {}
    rows = [("structure", "Dice", "HD95 mm")]
    for label, scores in result.get("per_structure", {}).items():
        if not isinstance(scores, dict):
            scores = {"dice": scores}
        name = f"{names[label]} ({label})" if label in names else f"label {label}"
        rows.append((name, _fmt(scores.get("dice")), _fmt(scores.get("hd95_mm"), "hd95_mm" in scores)))
    rows.append(("mean", _fmt(result.get("mean_dice")),
                 _fmt(result.get("mean_hd95_mm"), "mean_hd95_mm" in result)))
    rows.append(("all (binary)", _fmt(result.get("binary_dice")), ""))
    width = max(len(r[0]) for r in rows)
    lines = [f"{a:<{width}}  {b:>6}  {c:>8}".rstrip() for a, b, c in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _fmt(value, shown: bool = True) -> str:
    if not shown:
        return ""
    if value is None:
        return "n/a"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def changed_voxels(a, b) -> int:
    """Number of voxels whose label differs between two maps of the same shape."""
    first, second = _pair(a, b, names=("first", "second"))
    return int(np.count_nonzero(first != second))


# ---------------------------------------------------------------- inputs

def _array(image, name: str) -> np.ndarray:
    if isinstance(image, sitk.Image):
        return sitk.GetArrayViewFromImage(image)
    if isinstance(image, np.ndarray):
        return image
    raise InputError(f"{name}: need a label map (numpy array or SimpleITK image), "
                     f"got {type(image).__name__}")


def _pair(prediction, reference, names=("prediction", "reference")) -> tuple[np.ndarray, np.ndarray]:
    """Both maps as arrays of the same shape, else InputError."""
    if isinstance(prediction, sitk.Image) and isinstance(reference, sitk.Image):
        difference = grid_difference(prediction, reference)
        if difference:
            raise InputError(f"{names[0]}: grid differs from the {names[1]}'s: {difference}")
    pred, ref = _array(prediction, names[0]), _array(reference, names[1])
    if pred.shape != ref.shape:
        raise InputError(f"{names[0]}: shape {pred.shape} differs from the {names[1]}'s {ref.shape}")
    return pred, ref


def _labels(pred: np.ndarray, ref: np.ndarray, labels) -> list[int]:
    """The given labels, or every non-zero value in either map, sorted."""
    if labels is not None:
        return [int(label) for label in labels]
    values = np.union1d(np.unique(pred), np.unique(ref))
    return [int(v) for v in values if v != 0]
