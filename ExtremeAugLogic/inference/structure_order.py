"""One structure label per 3D object, in anatomical order: a post-processing step after prediction.

The voxel-wise argmax of the class probabilities can give one vertebra two levels from slice to
slice, and one wrong level makes its neighbours look shifted. This module (numpy, scipy and the
standard library only) offers two steps:

* ``detect_structure_order`` learns from the training label maps whether the structures always
  appear in the same order along one array axis (for example L1..L5 from head to feet);
* ``assign_structures`` turns probabilities into a label map where every 3D object takes one
  label (an object that clearly spans two structures is split in two), optionally in that order;
  given the structures' pitch along that axis, an object as long as several structures is cut
  into as many (merged vertebrae whose probabilities name one level).

Arrays are in numpy order (z, y, x); "axis" always means an axis of that spatial array.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# A component is split when its second structure's summed probability is at least this
# fraction of its best structure's ...
SPAN_RATIO = 0.35
# ... and each of the two structures holds a connected piece of at least this fraction of it.
SPAN_MIN_PART = 0.2
# Objects smaller than this fraction of the largest object are fragments, not structures.
FRAGMENT_FRACTION = 0.2
# Consecutive structure centroids must be at least this many times (sd_a + sd_b) apart.
MIN_SEPARATION = 1.0
# An object at least this many pitches long along the order axis is cut into round(length / pitch).
LONG_OBJECT_PITCHES = 1.5
# With a level range, an object whose centroid lies more than this many pitches beyond the first
# or last structure's expected centroid is not one of the labelled structures.
BEYOND_RANGE_PITCHES = 0.75
# A level reaching within this many pitches of the scan's first or last slice along the order axis
# is cut by the field of view: with more levels than labels, such levels leave the chain first.
EDGE_PITCHES = 0.1
# With a level cut by the field of view, a fragment of at least this fraction of the largest part
# lying wholly beyond the outermost level counts as a level: a structure the model found only in part.
TAIL_FRACTION = 0.05
# How the ordered step picks its chain of levels (see ``assign_structures``).
CHAINS = ("largest", "aligned", "largest-parts")


# ---------------------------------------------------------------------------------------------
# Order learnt from training label maps
# ---------------------------------------------------------------------------------------------

def _positions_along(label_map: np.ndarray, axis: int):
    """(voxel count, centroid, standard deviation) along ``axis`` for each label value.

    ``label_map`` must be int64: its histogram index (label x positions) overflows a uint8 map.
    """
    n_positions = label_map.shape[axis]
    shape = [1] * label_map.ndim
    shape[axis] = n_positions
    coordinate = np.arange(n_positions).reshape(shape)
    n_values = int(label_map.max()) + 1
    histogram = np.bincount((label_map * n_positions + coordinate).ravel(),
                            minlength=n_values * n_positions).reshape(n_values, n_positions)
    counts = histogram.sum(axis=1)
    positions = np.arange(n_positions, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        centroid = histogram @ positions / counts
        variance = histogram @ positions ** 2 / counts - centroid ** 2
    return counts, centroid, np.sqrt(np.maximum(variance, 0.0))


def _merge_chains(chains: list[list[int]], mean_position: dict[int, float]) -> list[int] | None:
    """One order agreeing with every chain (topological sort), or None when they contradict.

    Labels whose relative order no chain fixes are taken by increasing mean relative position.
    """
    nodes = sorted({label for chain in chains for label in chain})
    successors: dict[int, set[int]] = {label: set() for label in nodes}
    pending = {label: 0 for label in nodes}
    for chain in chains:
        for before, after in zip(chain, chain[1:]):
            if after not in successors[before]:
                successors[before].add(after)
                pending[after] += 1
    ready = [label for label in nodes if pending[label] == 0]
    merged = []
    while ready:
        label = min(ready, key=lambda value: (mean_position[value], value))
        ready.remove(label)
        merged.append(label)
        for after in sorted(successors[label]):
            pending[after] -= 1
            if pending[after] == 0:
                ready.append(after)
    return merged if len(merged) == len(nodes) else None


def _order_along(maps: list[np.ndarray], axis: int, min_separation: float):
    """(labels by increasing coordinate, mean separation) along ``axis``, or None if inconsistent."""
    chains, separations, relative = [], [], {}
    for label_map in maps:
        counts, centroid, spread = _positions_along(label_map, axis)
        present = [int(v) for v in np.flatnonzero(counts) if v > 0]
        for value in present:
            relative.setdefault(value, []).append(centroid[value] / label_map.shape[axis])
        chain = sorted(present, key=lambda value: centroid[value])
        for before, after in zip(chain, chain[1:]):
            gap = centroid[after] - centroid[before]
            joint_spread = max(spread[before] + spread[after], 1.0)
            if gap <= 0 or gap < min_separation * joint_spread:
                return None
            separations.append(gap / joint_spread)
        chains.append(chain)
    if not separations:  # no map shows two structures
        return None
    merged = _merge_chains(chains, {value: float(np.mean(p)) for value, p in relative.items()})
    if merged is None:
        return None
    return merged, float(np.mean(separations))


def _pitch_along(maps: list[np.ndarray], axis: int, labels: list[int], spacings) -> float | None:
    """Mean distance (mm) between the centroids of consecutive structures along ``axis``.

    A gap across a missing level counts as that many pitches; None when no map shows two.
    """
    position = {label: index for index, label in enumerate(labels)}
    pitches = []
    for label_map, spacing in zip(maps, spacings):
        counts, centroid, _ = _positions_along(label_map, axis)
        present = sorted((position[int(v)], centroid[v]) for v in np.flatnonzero(counts) if int(v) in position)
        for (i, a), (j, b) in zip(present, present[1:]):
            pitches.append(abs(b - a) / (j - i) * float(spacing[axis]))
    return float(np.mean(pitches)) if pitches else None


def _mostly_ascending(labels: list[int]) -> bool:
    """True when label values increase along the list for at least half of the pairs."""
    pairs = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:]]
    return sum(b > a for a, b in pairs) >= sum(b < a for a, b in pairs)


def detect_structure_order(label_arrays: list[np.ndarray], min_separation: float = MIN_SEPARATION,
                           spacings: list | None = None) -> dict | None:
    """The axis along which every training label map shows its structures in the same order.

    Rule: for each array axis, each map's structures (labels > 0 that are present) are sorted by
    their centroid along the axis. The axis is consistent when, in every map, consecutive
    centroids differ by more than 0 and by at least ``min_separation`` times the sum of the two
    structures' standard deviations along the axis (they do not substantially overlap), and the
    per-map orders agree: merged into one sequence (topological sort; a label whose place no map
    fixes goes by its mean relative position), with no contradiction such as 2 before 3 in one
    map and 3 before 2 in another. At least one map must show two structures. Among consistent
    axes the best separated wins: the largest mean of gap / (sum of the two standard
    deviations) over the consecutive pairs of all maps.

    Returns ``{"axis": a, "ascending": bool, "labels": [...]}`` with the labels listed by
    increasing coordinate along ``a``; ``ascending`` says whether label values increase along
    the axis (for a non-monotonic numbering: for at least half of the pairs). With ``spacings``
    (each map's voxel size in mm, in array-axis order) it also holds ``"pitch_mm"``: the mean
    distance between consecutive structures' centroids along ``a``. None when no axis is
    consistent, or when no map shows two structures.
    """
    maps = []
    for array in label_arrays:
        array = np.asarray(array)
        if array.size == 0:
            continue
        if not np.issubdtype(array.dtype, np.integer):
            if not np.all(np.mod(array, 1) == 0):
                raise ValueError("label maps must hold integer values")
        array = array.astype(np.int64)
        if array.min() < 0:
            raise ValueError("label maps must hold non-negative values")
        maps.append(array)
    if not maps:
        return None
    if len({array.ndim for array in maps}) != 1:
        raise ValueError("label maps must all have the same number of dimensions")
    best = None
    for axis in range(maps[0].ndim):
        found = _order_along(maps, axis, min_separation)
        if found is not None and (best is None or found[1] > best[2]):
            best = (axis, found[0], found[1])
    if best is None:
        return None
    axis, labels, _ = best
    order = {"axis": axis, "ascending": _mostly_ascending(labels), "labels": labels}
    if spacings is not None:
        if len(spacings) != len(maps):
            raise ValueError(f"{len(spacings)} spacings for {len(maps)} label maps")
        pitch = _pitch_along(maps, axis, labels, spacings)
        if pitch:
            order["pitch_mm"] = round(pitch, 3)
    return order


# ---------------------------------------------------------------------------------------------
# One label per object
# ---------------------------------------------------------------------------------------------

def foreground_mask(probabilities: np.ndarray) -> np.ndarray:
    """Voxels whose background probability is below one half: foreground first, structure second.

    The voxel-wise argmax calls a boundary voxel background when its foreground probability is
    split between two structures (0.4 background, 0.3 + 0.3 for two levels); on 14 unseen
    vertebral-body scans that lost 0.046 binary Dice (docs/results/generalisation-explore).
    """
    return probabilities[0] < 0.5


def _summed_probabilities(probabilities: np.ndarray, ids: np.ndarray, n_ids: int) -> np.ndarray:
    """(n_ids + 1, channels) sums of each channel's probability over the voxels of each id.

    Row 0 (background) and column 0 stay 0; only voxels with an id are visited.
    """
    voxels = np.flatnonzero(ids)
    voxel_ids = ids.ravel()[voxels]
    sums = np.zeros((n_ids + 1, probabilities.shape[0]))
    for channel in range(1, probabilities.shape[0]):
        sums[:, channel] = np.bincount(voxel_ids, weights=probabilities[channel].ravel()[voxels],
                                       minlength=n_ids + 1)
    return sums


def _largest_piece(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected piece of ``mask`` (empty when ``mask`` is)."""
    pieces, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(pieces.ravel())
    sizes[0] = 0
    return pieces == sizes.argmax()


def _split_spanning(probabilities, ids, sizes, sums, span_ratio, span_min_part, fragment_fraction):
    """Split, in place in ``ids``, the components spanning two structures (span rule).

    Returns ``sizes`` and ``sums`` extended with one row per new part (and reduced for the
    components that lost it). Only components of at least ``fragment_fraction`` of the largest
    one are considered.
    """
    if probabilities.shape[0] < 3:
        return sizes, sums
    ranked = np.argsort(-sums[:, 1:], axis=1, kind="stable") + 1
    best, second = ranked[:, 0], ranked[:, 1]
    rows = np.arange(len(sizes))
    candidates = np.flatnonzero((sums[rows, second] >= span_ratio * sums[rows, best])
                                & (sums[rows, best] > 0)
                                & (sizes >= max(fragment_fraction * sizes[1:].max(), 2)))
    candidates = candidates[candidates > 0]
    if candidates.size == 0:
        return sizes, sums
    lookup = np.zeros(len(sizes), dtype=np.int32)  # bounding boxes of the candidates only
    lookup[candidates] = np.arange(1, candidates.size + 1)
    boxes = ndimage.find_objects(lookup[ids])
    new_sizes, new_sums = [], []
    for component, box in zip(candidates, boxes):
        inside = ids[box] == component
        best_side = inside & (probabilities[best[component]][box] >= probabilities[second[component]][box])
        second_side = inside & ~best_side
        best_core, second_core = _largest_piece(best_side), _largest_piece(second_side)
        needed = span_min_part * sizes[component]
        if best_core.sum() < needed or second_core.sum() < needed:
            continue
        # Each structure keeps its largest piece; stray pieces go to the other structure.
        new_part = second_core | (best_side & ~best_core)
        _move_to_new_part(probabilities, ids, box, new_part, component, sizes, sums, new_sizes, new_sums)
    return _with_new_parts(sizes, sums, new_sizes, new_sums)


def _move_to_new_part(probabilities, ids, box, voxels, old, sizes, sums, new_sizes, new_sums) -> None:
    """Give ``voxels`` (a mask inside ``box``) of part ``old`` the next new id, moving their size and sums."""
    ids[box][voxels] = len(sizes) + len(new_sizes)
    part_sums = probabilities[(slice(None),) + box][:, voxels].sum(axis=1, dtype=np.float64)
    part_sums[0] = 0.0
    new_sizes.append(int(voxels.sum()))
    new_sums.append(part_sums)
    sizes[old] -= new_sizes[-1]
    sums[old] -= part_sums


def _with_new_parts(sizes, sums, new_sizes, new_sums):
    """``sizes`` and ``sums`` extended with the rows of the new parts."""
    if not new_sizes:
        return sizes, sums
    return np.concatenate([sizes, new_sizes]), np.vstack([sums, new_sums])


def _split_long(probabilities, ids, sizes, sums, axis, pitch, fragment_fraction):
    """Cut, in place in ``ids``, every large part as long as several structures along ``axis``.

    A part (at least ``fragment_fraction`` of the largest) that spans ``length`` >=
    ``LONG_OBJECT_PITCHES`` x ``pitch`` voxels along the axis is cut across the axis into
    n = round(length / pitch) pieces, each cut at the thinnest cross-section (fewest voxels of
    the part) within a quarter pitch of the even division: touching vertebrae meet at their
    discs. Returns ``sizes`` and ``sums`` extended with one row per new piece.
    """
    n_ids = len(sizes) - 1
    if n_ids == 0 or not pitch or pitch <= 0:
        return sizes, sums
    first, last = _extent_along(ids, axis, n_ids)
    length = last - first + 1
    large = np.flatnonzero((sizes >= max(fragment_fraction * sizes[1:].max(), 2))
                           & (length >= LONG_OBJECT_PITCHES * pitch))
    large = large[large > 0]
    if large.size == 0:
        return sizes, sums
    lookup = np.zeros(len(sizes), dtype=np.int32)
    lookup[large] = np.arange(1, large.size + 1)
    boxes = ndimage.find_objects(lookup[ids])
    across = tuple(a for a in range(ids.ndim) if a != axis)
    new_sizes, new_sums = [], []
    for part, box in zip(large, boxes):
        inside = ids[box] == part
        n_pieces = int(round(length[part] / pitch))
        area = inside.sum(axis=across)  # voxels of the part per position along the axis
        cuts = []
        for k in range(1, n_pieces):
            centre = k * len(area) / n_pieces
            low = max(int(np.ceil(centre - pitch / 4)), 1)
            high = min(int(np.floor(centre + pitch / 4)), len(area) - 1)
            if low <= high:
                cuts.append(low + int(np.argmin(area[low:high + 1])))
        cuts = sorted(set(cuts))
        shape = [1] * ids.ndim
        shape[axis] = inside.shape[axis]
        piece = np.searchsorted(np.array(cuts), np.arange(inside.shape[axis]), side="right").reshape(shape)
        for k in range(1, len(cuts) + 1):
            new_part = inside & (piece == k)
            if new_part.any():
                _move_to_new_part(probabilities, ids, box, new_part, part, sizes, sums, new_sizes, new_sums)
    return _with_new_parts(sizes, sums, new_sizes, new_sums)


def _centroids_along(ids: np.ndarray, sizes: np.ndarray, axis: int) -> np.ndarray:
    """Mean index along ``axis`` of every id's voxels (``sizes``: voxels per id; nan where 0)."""
    shape = [1] * ids.ndim
    shape[axis] = ids.shape[axis]
    coordinate = np.broadcast_to(np.arange(ids.shape[axis], dtype=np.float32).reshape(shape), ids.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.bincount(ids.ravel(), weights=coordinate.ravel(), minlength=len(sizes)) / sizes


def _drop_beyond_range(ids, sizes, axis, level_range, n_structures, pitch) -> None:
    """Zero, in place, the objects whose centroid along ``axis`` lies beyond the level range.

    ``level_range``: the expected centroids (first, last) of the first and last structures; the
    margin is ``BEYOND_RANGE_PITCHES`` pitches (``pitch``, else the range over its gaps).
    """
    first, last = sorted(float(v) for v in level_range)
    if not pitch:
        pitch = (last - first) / max(n_structures - 1, 1)
    margin = BEYOND_RANGE_PITCHES * pitch
    centroid = _centroids_along(ids, sizes, axis)
    beyond = (sizes > 0) & ((centroid < first - margin) | (centroid > last + margin))
    beyond[0] = False
    if beyond.any() and ((sizes[1:] > 0) & ~beyond[1:]).any():  # a range that would leave nothing is not trusted
        ids[beyond[ids]] = 0
        sizes[beyond] = 0


def _extent_along(ids: np.ndarray, axis: int, n_ids: int):
    """(first, last) index along ``axis`` of every id (-1 for ids absent)."""
    first = np.full(n_ids + 1, -1, dtype=np.int64)
    last = np.full(n_ids + 1, -1, dtype=np.int64)
    n_positions = ids.shape[axis]
    for position in range(n_positions):
        last[np.take(ids, position, axis=axis)] = position
        first[np.take(ids, n_positions - 1 - position, axis=axis)] = n_positions - 1 - position
    return first, last


def _increasing_assignment(scores: np.ndarray) -> list[int]:
    """Strictly increasing column per row maximising the total score (rows <= columns)."""
    n_rows, n_columns = scores.shape
    total = np.full((n_rows, n_columns), -np.inf)
    previous = np.zeros((n_rows, n_columns), dtype=np.int64)
    total[0] = scores[0]
    for row in range(1, n_rows):
        best_before, best_column = -np.inf, -1
        for column in range(1, n_columns):
            if total[row - 1, column - 1] > best_before:
                best_before, best_column = total[row - 1, column - 1], column - 1
            if best_column >= 0:
                total[row, column] = scores[row, column] + best_before
                previous[row, column] = best_column
    columns = [int(np.argmax(total[-1]))]
    for row in range(n_rows - 1, 0, -1):
        columns.append(int(previous[row, columns[-1]]))
    return columns[::-1]


def _aligned_assignment(scores: np.ndarray) -> list[int]:
    """Column per row, increasing, maximising the total score; a row may stay out (-1).

    The monotone alignment of rows (parts, in order) with columns (labels, in order): each
    column is used at most once, a row takes no column or one beyond its predecessors', and
    columns may stay unused. On equal totals a row stays out rather than take a column worth 0.
    """
    n_rows, n_columns = scores.shape
    total = np.zeros((n_rows + 1, n_columns + 1))
    move = np.zeros((n_rows + 1, n_columns + 1), dtype=np.int8)  # 0 row out, 1 column unused, 2 match
    for row in range(1, n_rows + 1):
        for column in range(1, n_columns + 1):
            options = (total[row - 1, column], total[row, column - 1],
                       total[row - 1, column - 1] + scores[row - 1, column - 1])
            move[row, column] = int(np.argmax(options))
            total[row, column] = options[move[row, column]]
    columns, row, column = [-1] * n_rows, n_rows, n_columns
    while row > 0 and column > 0:
        step = move[row, column]
        if step == 2:
            columns[row - 1] = column - 1
        if step != 1:
            row -= 1
        if step != 0:
            column -= 1
    return columns


def _fragment_positions(fragments, structures, structure_positions, first, last, sizes, sums,
                        sequence):
    """Position in ``sequence`` of each fragment: joined, free label, or nearer neighbour."""
    f_first, f_last = first[fragments][:, None], last[fragments][:, None]
    s_first, s_last = first[structures][None], last[structures][None]
    positions = structure_positions[None]
    overlap = np.minimum(f_last, s_last) - np.maximum(f_first, s_first) + 1
    # Most overlap wins; between equal overlaps, the larger structure (fraction < 1 breaks ties).
    host = np.argmax(overlap + 0.5 * sizes[structures][None] / sizes.max(), axis=1)
    joined = overlap.max(axis=1) > 0

    below, above = s_last < f_first, s_first > f_last
    free_first = np.where(below, positions, -1).max(axis=1) + 1
    free_last = np.where(above, positions, len(sequence)).min(axis=1) - 1
    columns = np.arange(len(sequence))[None]
    is_free = (columns >= free_first[:, None]) & (columns <= free_last[:, None])
    free_choice = np.argmax(np.where(is_free, sums[np.ix_(fragments, sequence)], -np.inf), axis=1)

    gap_below = np.where(below, f_first - s_last, np.inf)
    gap_above = np.where(above, s_first - f_last, np.inf)
    nearer = np.where(gap_below.min(axis=1) <= gap_above.min(axis=1),
                      structure_positions[np.argmin(gap_below, axis=1)],
                      structure_positions[np.argmin(gap_above, axis=1)])
    return np.where(joined, structure_positions[host],
                    np.where(free_first <= free_last, free_choice, nearer))


def _levels_along(parts, centroid, first, last, sizes) -> list[list[int]]:
    """``parts`` grouped into levels along the order axis, in order: side-by-side parts share one.

    Two parts lie side by side (one structure split across, e.g. left and right halves) when
    each one's centroid lies within the other's extent along the axis; a part is compared with
    the largest part of the level before it.
    """
    levels: list[list[int]] = []
    for part in parts[np.argsort(centroid[parts], kind="stable")]:
        if levels:
            main = max(levels[-1], key=lambda p: sizes[p])
            if first[main] <= centroid[part] <= last[main] and first[part] <= centroid[main] <= last[part]:
                levels[-1].append(int(part))
                continue
        levels.append([int(part)])
    return levels


def _level_centroids(levels, centroid, sizes) -> np.ndarray:
    """Voxel-weighted centroid of each level along the order axis."""
    return np.array([np.average(centroid[level], weights=sizes[level]) for level in levels])


def _cut_by_view(levels, level_centroid, first, last, n_positions, pitch) -> np.ndarray:
    """Per level: does a part reach within ``EDGE_PITCHES`` pitches of the scan's first or last position?

    ``pitch`` in voxels; without it, the median distance between consecutive levels.
    """
    if not pitch:
        pitch = float(np.median(np.diff(level_centroid))) if len(levels) > 1 else 0.0
    edge = EDGE_PITCHES * pitch
    return np.array([bool(np.any((first[level] <= edge) | (last[level] >= n_positions - 1 - edge)))
                     for level in levels])


def _levels_beyond(levels, fragments, centroid, first, last, sizes, min_size) -> list[list[int]]:
    """Levels made of the ``fragments`` (at least ``min_size`` voxels) lying wholly before the first
    or wholly after the last of ``levels`` along the order axis, in order."""
    start, end = first[levels[0]].min(), last[levels[-1]].max()
    outside = fragments[(sizes[fragments] >= min_size) & ((last[fragments] < start) | (first[fragments] > end))]
    return _levels_along(outside, centroid, first, last, sizes) if outside.size else []


def _with_levels_beyond(levels, fragments, n_labels, centroid, first, last, sizes, n_positions, pitch):
    """``levels`` and, when one of them is cut by the field of view, the fragments' levels beyond their ends.

    The model may find the vertebra above L1 (cut by the scan's edge) and only a piece of L5: five
    large levels for five labels, every one shifted. Counting the piece of L5 as a level makes six,
    and the level cut by the view leaves the chain (``_surplus_levels_out``). Without a level cut
    by the view, or when the levels do not outnumber the labels even so, ``levels`` is returned.
    """
    if not levels or fragments.size == 0:
        return levels
    level_centroid = _level_centroids(levels, centroid, sizes)
    if not _cut_by_view(levels, level_centroid, first, last, n_positions, pitch).any():
        return levels
    largest = max(sizes[part] for level in levels for part in level)
    beyond = _levels_beyond(levels, fragments, centroid, first, last, sizes, TAIL_FRACTION * largest)
    if len(levels) + len(beyond) <= n_labels:
        return levels
    everything = levels + beyond
    return [everything[i] for i in np.argsort(_level_centroids(everything, centroid, sizes), kind="stable")]


def _surplus_levels_out(levels, n_labels, centroid, first, last, sizes, n_positions, pitch):
    """(levels kept, parts beyond the kept ones' ends) when there are more levels than labels.

    The levels kept are those not cut by the field of view (no part within ``EDGE_PITCHES``
    pitches of the first or last position along the axis), then the largest (summed voxels).
    ``pitch`` in voxels; without it, the median distance between consecutive levels. The parts
    of a level left out whose centroid lies beyond the first or last kept level are returned:
    a structure beyond the labelled ones (T12 above L1, the sacrum below L5); a level left out
    between kept ones is a piece of one of them.
    """
    level_centroid = _level_centroids(levels, centroid, sizes)
    cut_by_view = _cut_by_view(levels, level_centroid, first, last, n_positions, pitch)
    total = np.array([sizes[level].sum() for level in levels])
    keep = np.sort(np.lexsort((-total, cut_by_view))[:n_labels])
    low, high = level_centroid[keep].min(), level_centroid[keep].max()
    beyond = [part for index, level in enumerate(levels) if index not in keep
              and not low <= level_centroid[index] <= high for part in level]
    return [levels[index] for index in keep], beyond


def _order_labels(part_label, ids, sizes, sums, order, fragment_fraction, chain="largest", pitch=None) -> None:
    """Relabel, in place in ``part_label``, the parts whose label is in ``order`` (see rule)."""
    n_ids, n_channels = len(sizes) - 1, sums.shape[1]
    sequence = []
    for value in order["labels"]:
        if 1 <= int(value) < n_channels and int(value) not in sequence:
            sequence.append(int(value))
    axis = int(order["axis"])
    if not sequence or not 0 <= axis < ids.ndim:
        raise ValueError(f"order {order} does not fit probabilities with {n_channels} channels")
    sequence = np.array(sequence)
    position_of = np.full(n_channels, -1)
    position_of[sequence] = np.arange(len(sequence))
    ordered = np.flatnonzero((position_of[part_label] >= 0) & (sizes > 0))
    if ordered.size == 0:
        return

    centroid = _centroids_along(ids, sizes, axis)
    first, last = _extent_along(ids, axis, n_ids)

    large = ordered[sizes[ordered] >= fragment_fraction * sizes[ordered].max()]
    structures = None
    if chain == "aligned" and len(large) > len(sequence):  # more large parts than labels
        large = large[np.argsort(centroid[large], kind="stable")]
        positions = np.array(_aligned_assignment(sums[np.ix_(large, sequence)]))
        if (positions >= 0).any():
            structures, structure_positions = large[positions >= 0], positions[positions >= 0]
    if structures is None:  # one part per level, the levels as many as labels
        if chain == "largest-parts":  # the rule before levels: each part a level, the largest kept
            kept = large[np.argsort(-sizes[large], kind="stable")][:len(sequence)]
            levels = [[part] for part in kept[np.argsort(centroid[kept], kind="stable")]]
        else:
            levels = _levels_along(large, centroid, first, last, sizes)
            levels = _with_levels_beyond(levels, np.setdiff1d(ordered, large), len(sequence), centroid, first,
                                         last, sizes, ids.shape[axis], pitch)
        if len(levels) > len(sequence):
            levels, beyond = _surplus_levels_out(levels, len(sequence), centroid, first, last, sizes,
                                                 ids.shape[axis], pitch)
            part_label[beyond] = 0
            ordered = np.setdiff1d(ordered, beyond)
        structures = np.array([max(level, key=lambda p: sizes[p]) for level in levels])
        structure_positions = np.array(_increasing_assignment(sums[np.ix_(structures, sequence)]))
    part_label[structures] = sequence[structure_positions]

    fragments = np.setdiff1d(ordered, structures)
    if fragments.size:
        part_label[fragments] = sequence[_fragment_positions(
            fragments, structures, structure_positions, first, last, sizes, sums, sequence)]


def assign_structures(probabilities: np.ndarray, order: dict | None = None, min_voxels: int = 0, *,
                      span_ratio: float = SPAN_RATIO, span_min_part: float = SPAN_MIN_PART,
                      fragment_fraction: float = FRAGMENT_FRACTION, chain: str = "largest",
                      pitch: float | None = None, level_range: tuple[float, float] | None = None) -> np.ndarray:
    """uint8 label map (z, y, x) with one structure label per 3D object.

    ``probabilities``: (K+1, z, y, x), channel 0 background. Steps:

    1. Objects: face-connected (6-neighbour) components of the foreground (``foreground_mask``);
       components smaller than ``min_voxels`` become background and play no further part.
       With ``order`` and ``level_range`` (where the first and last structures' centroids are
       expected along the order axis, e.g. from the delineated scans registered onto this one,
       ``level_range.LevelGuide``), components whose centroid lies more than 0.75 pitch beyond
       either end are background too: a vertebra above L1 or below L5 is not a lumbar level.
    2. Span rule: a component of at least ``fragment_fraction`` of the largest one is split when
       its summed probability for its second-best structure is at least ``span_ratio`` (0.35)
       of its best one AND, choosing voxel by voxel the more probable of those two structures,
       each of the two holds a face-connected piece of at least ``span_min_part`` (20 %) of the
       component. Each structure then keeps its largest piece plus the other's stray pieces
       (one part per structure). A level flipping from slice to slice does not split: its
       pieces are single slices.
    3. Long objects (with ``order`` and ``pitch``, the distance between consecutive structures
       along ``order["axis"]`` in voxels of this array): a part at least 1.5 pitches long is cut
       across the axis into round(length / pitch) pieces at its thinnest cross-sections
       (``_split_long``): vertebrae merged through their discs, whose probabilities may all
       name one level, become one part per vertebra for the ordered step.
    4. Each component or part takes the structure with the largest summed probability over its
       voxels.
    5. With ``order`` (from ``detect_structure_order``; only "axis" and "labels" are read),
       parts whose label from step 4 is in ``order["labels"]`` are relabelled (the others keep
       it). Large parts (at least ``fragment_fraction`` of the largest such part) are sorted by
       centroid along ``order["axis"]``. With ``chain="largest"`` (the default) they are grouped
       into levels: a part whose centroid lies within the extent of the previous level's largest
       part, and the other way round, lies beside it (a structure split across) and joins that
       level. When there are more levels than labels, the levels kept are those not cut by the
       field of view (no part within 0.1 pitch of the scan's first or last slice along the axis;
       the pitch is ``pitch``, else the median distance between levels), then the largest. When a
       level is cut by the field of view, fragments (see below) of at least 5 % of the largest
       part lying wholly beyond the first or last level count as levels in this choice: the
       vertebra above L1 cut by the scan's edge and only a piece of L5 make six levels, not five
       shifted ones. The levels left out beyond the first or last kept one are background (a T12
       or a sacrum segmented as a vertebra, often cut by the scan's edge, is not a lumbar level), those
       between kept ones become fragments. The largest part of each kept level joins the chain:
       the chain takes strictly increasing positions in
       ``order["labels"]`` maximising the total SUMMED PROBABILITY of each part for its label
       (not log-probability, which a few near-zero voxels would dominate), by dynamic
       programming over (part, label): a label may stay unused (missing level), no two parts
       share one; the other parts become fragments. With ``chain="aligned"``, when there are
       more large parts than labels, all of them are aligned with the labels in order by the
       same objective, and a large part may stay out of the chain (an extra vertebra beyond the
       labelled ones, or one half of a split) as a fragment. ``chain="largest-parts"`` is the
       rule before levels: the largest parts, as many as labels, form the chain (self-training's
       pseudo-labels keep it: they were measured with it). Fragments
       are not forced into the sequence: one whose extent along the axis overlaps a
       structure's joins (takes the label of) the structure it overlaps most; otherwise it takes
       its most probable label among those free between its neighbouring structures' labels,
       or, when none is free, joins the nearer neighbour. Fragments may thus share a label.
    """
    if chain not in CHAINS:
        raise ValueError(f"chain {chain!r}: must be one of {', '.join(CHAINS)}")
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 4:
        raise ValueError(f"probabilities must be (channels, z, y, x), got shape {probabilities.shape}")
    n_channels = probabilities.shape[0]
    if n_channels > 256:
        raise ValueError(f"{n_channels} channels do not fit a uint8 label map")
    if n_channels < 2:
        return np.zeros(probabilities.shape[1:], np.uint8)

    foreground = foreground_mask(probabilities)
    ids, n_ids = ndimage.label(foreground)
    if n_ids == 0:
        return np.zeros(probabilities.shape[1:], np.uint8)
    sizes = np.bincount(ids.ravel(), minlength=n_ids + 1)
    too_small = sizes < max(int(min_voxels), 1)
    too_small[0] = False
    if too_small.any():
        ids[too_small[ids]] = 0
        sizes[too_small] = 0
    if order is not None and level_range is not None:
        _drop_beyond_range(ids, sizes, int(order["axis"]), level_range, len(order["labels"]), pitch)
    sums = _summed_probabilities(probabilities, ids, n_ids)
    sizes, sums = _split_spanning(probabilities, ids, sizes, sums, span_ratio, span_min_part,
                                  fragment_fraction)
    if order is not None and pitch:
        sizes, sums = _split_long(probabilities, ids, sizes, sums, int(order["axis"]), float(pitch),
                                  fragment_fraction)

    part_label = np.argmax(sums[:, 1:], axis=1) + 1
    part_label[sizes <= 0] = 0
    part_label[0] = 0
    if order is not None:
        _order_labels(part_label, ids, sizes, sums, order, fragment_fraction, chain, pitch)
    return part_label.astype(np.uint8)[ids]
