"""Training patch positions on preprocessed slices: the paper's grid and foreground-aware centres.

Patches are described by their centre (slice, row, col) on the square slices; the augmentation
samples each patch straight from its whole slice, so a centre near the border is fine.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def grid_starts(length: int, patch: int, stride: int) -> list[int]:
    """Start offsets of patches of ``patch`` px every ``stride`` px, the last flush with the end."""
    if length <= patch:
        return [0]
    starts = list(range(0, length - patch + 1, stride))
    if starts[-1] != length - patch:
        starts.append(length - patch)
    return starts


def grid_centres(n_slices: int, size: int, patch: int = 128, stride: int = 64) -> np.ndarray:
    """Centres (slice, row, col) of the paper's grid patches on every slice, as an (N, 3) array."""
    starts = grid_starts(size, patch, stride)
    half = patch // 2
    centres = [(s, r + half, c + half) for s in range(n_slices) for r in starts for c in starts]
    return np.array(centres, dtype=np.int64).reshape(-1, 3)


def patch_window(centre_rc, patch: int):
    """(row0, row1, col0, col1) of a patch centred at ``centre_rc`` (may lie outside the slice)."""
    r0 = int(centre_rc[0]) - patch // 2
    c0 = int(centre_rc[1]) - patch // 2
    return r0, r0 + patch, c0, c0 + patch


def edge_statistics(labels: np.ndarray, centres: np.ndarray, patch: int) -> dict:
    """How patches meet the structures: with foreground, without, and cutting one at the edge.

    A patch *cuts* a structure when it holds part of a connected structure (per slice and
    label) but not all of it. ``cut_fraction`` is among patches with foreground;
    ``cut_pixel_fraction`` is the share of the foreground pixels in those patches that lie in a
    cut structure: the part of each such structure the network sees without its outline.
    """
    components = [_components(labels[s]) for s in range(labels.shape[0])]
    with_fg = cut = fg_pixels = cut_pixels = 0
    for s, r, c in centres:
        comp, sizes = components[s]
        r0, r1, c0, c1 = patch_window((r, c), patch)
        window = comp[max(r0, 0):max(r1, 0), max(c0, 0):max(c1, 0)]
        ids, inside = np.unique(window[window > 0], return_counts=True)
        if ids.size == 0:
            continue
        with_fg += 1
        fg_pixels += int(inside.sum())
        partial = inside < sizes[ids]
        if partial.any():
            cut += 1
            cut_pixels += int(inside[partial].sum())
    total = len(centres)
    return {
        "patches": total,
        "with_foreground": with_fg,
        "without_foreground": total - with_fg,
        "cutting_a_structure": cut,
        "foreground_fraction": with_fg / total if total else 0.0,
        "cut_fraction": cut / with_fg if with_fg else 0.0,
        "cut_pixel_fraction": cut_pixels / fg_pixels if fg_pixels else 0.0,
    }


def _components(label_slice: np.ndarray):
    """Connected components of every label in one slice: (component map, sizes by id)."""
    comp = np.zeros(label_slice.shape, dtype=np.int32)
    next_id = 0
    for value in np.unique(label_slice[label_slice > 0]):
        labelled, count = ndimage.label(label_slice == value)
        comp[labelled > 0] = labelled[labelled > 0] + next_id
        next_id += count
    sizes = np.bincount(comp.ravel(), minlength=next_id + 1)
    return comp, sizes


def foreground_centres(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` centres on foreground pixels, the structures drawn in equal shares."""
    values = np.unique(labels[labels > 0])
    if values.size == 0 or count <= 0:
        return np.zeros((0, 3), dtype=np.int64)
    picks = []
    for i, value in enumerate(values):
        share = count // values.size + (1 if i < count % values.size else 0)
        coords = np.argwhere(labels == value)
        picks.append(coords[rng.integers(0, len(coords), size=share)])
    return np.concatenate(picks).astype(np.int64)


def base_centres(labels: np.ndarray, patch: int = 128, stride: int = 64,
                 sampling: str = "foreground", fg_fraction: float = 0.67,
                 seed: int = 0) -> np.ndarray:
    """The base patches each augmentation level multiplies.

    ``sampling="grid"``: the paper's grid patches on every slice. ``"foreground"`` (default):
    the grid patches that hold foreground, topped up with foreground-centred patches and a
    sample of background grid patches so that ``fg_fraction`` of them hold foreground and
    every structure is the centre of some patches.
    """
    grid = grid_centres(labels.shape[0], labels.shape[1], patch, stride)
    if sampling == "grid":
        return grid
    if sampling != "foreground":
        raise ValueError(f"sampling must be grid or foreground, not {sampling!r}")
    rng = np.random.default_rng(seed)
    has_fg = np.array([_holds_foreground(labels, centre, patch) for centre in grid], dtype=bool)
    fg_grid, bg_grid = grid[has_fg], grid[~has_fg]
    n_fg = max(len(fg_grid) * 2, 1)
    centred = foreground_centres(labels, n_fg - len(fg_grid), rng)
    n_bg = int(round(n_fg * (1 - fg_fraction) / max(fg_fraction, 1e-6)))
    bg = bg_grid[rng.permutation(len(bg_grid))[:n_bg]] if len(bg_grid) else bg_grid
    return np.concatenate([fg_grid, centred, bg]).astype(np.int64)


def _holds_foreground(labels: np.ndarray, centre, patch: int) -> bool:
    r0, r1, c0, c1 = patch_window(centre[1:], patch)
    return bool(labels[centre[0], max(r0, 0):r1, max(c0, 0):c1].any())
