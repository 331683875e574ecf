"""Two label maps on one grid (numpy arrays): their Dice, and what a correction changed.

Numpy only, so that adding a corrected case measures it without loading torch: the workspace
records each accepted correction with these functions, and ``evaluation.metrics.dice_scores``
(every other Dice of the engine) computes through ``dice_scores`` here.
"""

from __future__ import annotations

import numpy as np


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(a & b)) / total


def dice_scores(prediction: np.ndarray, reference: np.ndarray, labels: list[int]) -> dict:
    """``{"per_structure": {label: dice}, "mean_dice", "binary_dice"}`` of two arrays of one shape.

    ``mean_dice``: the mean over the ``labels`` present in the reference (over all of them if
    it has none); ``binary_dice``: the ``labels`` merged into one foreground.
    """
    per_structure = {label: dice(prediction == label, reference == label) for label in labels}
    present = [label for label in labels if np.any(reference == label)] or list(per_structure)
    return {
        "per_structure": per_structure,
        "mean_dice": float(np.mean([per_structure[k] for k in present])) if present else 1.0,
        "binary_dice": dice(np.isin(prediction, labels), np.isin(reference, labels)),
    }


def correction_effort(prediction: np.ndarray, corrected: np.ndarray, slice_axis: int) -> dict:
    """What a correction changed: voxels, slices (along ``slice_axis``, numpy order) and structures."""
    differs = prediction != corrected
    others = tuple(a for a in range(differs.ndim) if a != slice_axis)
    structures = np.union1d(np.unique(prediction[differs]), np.unique(corrected[differs]))
    return {"changed_voxels": int(np.count_nonzero(differs)),
            "slices_touched": int(np.count_nonzero(differs.any(axis=others))),
            "structures_changed": [int(v) for v in structures if v != 0]}
