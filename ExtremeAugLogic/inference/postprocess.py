"""Label maps from probabilities: argmax, then clean-up of small disconnected specks."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

DEFAULT_MIN_COMPONENT_FRACTION = 0.1


def remove_specks(labels: np.ndarray, min_fraction: float) -> np.ndarray:
    """Drop, per structure, components smaller than ``min_fraction`` of its largest one (0 keeps all)."""
    if min_fraction <= 0:
        return labels
    out = labels.copy()
    for value in np.unique(labels[labels > 0]):
        components, count = ndimage.label(labels == value)
        if count < 2:
            continue
        sizes = np.bincount(components.ravel())[1:]
        small = np.flatnonzero(sizes < min_fraction * sizes.max()) + 1
        out[np.isin(components, small)] = 0
    return out
