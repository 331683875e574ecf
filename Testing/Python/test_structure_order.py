"""One structure label per 3D object, in anatomical order: hand-built probability volumes."""

import time

import numpy as np
import pytest
from scipy import ndimage

from ExtremeAugLogic.inference.structure_order import assign_structures, detect_structure_order

N_LEVELS = 5
ORDER = {"axis": 0, "ascending": True, "labels": [1, 2, 3, 4, 5]}


def stacked_boxes(levels=(1, 2, 3, 4, 5), shape=(40, 16, 16), thickness=6, gap=2, start=1):
    """Label map with one box per entry of ``levels`` stacked along axis 0 (0 = no box there)."""
    labels = np.zeros(shape, np.uint8)
    for position, level in enumerate(levels):
        z0 = start + position * (thickness + gap)
        labels[z0:z0 + thickness, 3:13, 3:13] = level
    return labels


def box_slices(position, thickness=6, gap=2, start=1):
    """Index of box ``position`` in a ``stacked_boxes`` map."""
    z0 = start + position * (thickness + gap)
    return np.s_[z0:z0 + thickness, 3:13, 3:13]


def soft_probabilities(labels, n_levels=N_LEVELS, sigma=0.5, sharpness=6.0):
    """(n_levels + 1, z, y, x) float32: softmax of a smoothed one-hot of ``labels``."""
    onehot = np.stack([labels == k for k in range(n_levels + 1)]).astype(np.float32)
    logits = sharpness * ndimage.gaussian_filter(onehot, sigma=(0, sigma, sigma, sigma))
    exp = np.exp(logits - logits.max(axis=0))
    return (exp / exp.sum(axis=0)).astype(np.float32)


def set_probabilities(probabilities, index, values):
    """Give the voxels at ``index`` the channel probabilities ``values`` ({channel: p}, rest 0)."""
    for channel in range(probabilities.shape[0]):
        probabilities[(channel,) + index] = values.get(channel, 0.0)


def test_soft_volume_is_the_plain_argmax():
    labels = stacked_boxes()
    probabilities = soft_probabilities(labels)
    assert np.array_equal(probabilities.argmax(0), labels)  # the helper itself is sound
    out = assign_structures(probabilities)
    assert out.dtype == np.uint8 and out.shape == labels.shape
    assert np.array_equal(out, labels)
    assert np.array_equal(assign_structures(probabilities, ORDER), labels)


def test_level_flipping_slice_to_slice_gets_one_label():
    labels = stacked_boxes()
    probabilities = soft_probabilities(labels)
    z, y, x = box_slices(1)
    for offset, sl in enumerate(range(z.start, z.stop)):
        if offset % 2:  # every other slice says L3 by a little
            set_probabilities(probabilities, (sl, y, x), {2: 0.44, 3: 0.51, 0: 0.05})
        else:
            set_probabilities(probabilities, (sl, y, x), {2: 0.56, 3: 0.39, 0: 0.05})
    flipped = probabilities.argmax(0)[box_slices(1)]
    assert set(np.unique(flipped)) == {2, 3}  # the voxel argmax changes level
    for order in (None, ORDER):
        out = assign_structures(probabilities, order)
        assert np.all(out[box_slices(1)] == 2)
        assert np.array_equal(out, labels)


def test_component_spanning_two_levels_is_split():
    labels = stacked_boxes()
    labels[box_slices(1)[0].stop:box_slices(2)[0].start, 3:13, 3:13] = 2  # L2 now touches L3
    probabilities = soft_probabilities(labels)
    component, count = ndimage.label(probabilities.argmax(0) != 0)
    assert count == 4  # L2 and L3 form one component
    for order in (None, ORDER):
        out = assign_structures(probabilities, order)
        assert np.array_equal(out, labels)
    # Without the span rule (threshold above 1) the joined component takes one label.
    out = assign_structures(probabilities, span_ratio=1.01)
    joined = component == component[box_slices(1)][0, 0, 0]
    assert len(np.unique(out[joined])) == 1


def test_small_second_level_does_not_split():
    labels = stacked_boxes()
    cap = box_slices(1)[0].stop - 1  # the last slice of the L2 box says L3: 1/6 of it
    labels[cap, 3:13, 3:13] = 3
    probabilities = soft_probabilities(labels)
    out = assign_structures(probabilities)
    assert np.all(out[box_slices(1)] == 2) and np.all(out[cap, 3:13, 3:13] == 2)


def test_missing_level_does_not_shift_the_others():
    labels = stacked_boxes(levels=(1, 2, 0, 4, 5))
    probabilities = soft_probabilities(labels)
    for order in (None, ORDER):
        out = assign_structures(probabilities, order)
        assert np.array_equal(out, labels)
        assert 3 not in out


def test_level_out_of_order_is_fixed_by_the_order():
    labels = stacked_boxes()
    probabilities = soft_probabilities(labels)
    set_probabilities(probabilities, box_slices(1), {3: 0.6, 2: 0.35, 0: 0.05})  # L2 box says L3
    unordered = assign_structures(probabilities)
    assert np.all(unordered[box_slices(1)] == 3)  # per-component best label
    ordered = assign_structures(probabilities, ORDER)
    assert np.array_equal(ordered, labels)  # L2 back, L3..L5 not shifted


def test_first_level_mislabelled_does_not_shift_the_rest():
    labels = stacked_boxes(levels=(1, 2, 3, 4, 0))
    probabilities = soft_probabilities(labels)
    set_probabilities(probabilities, box_slices(0), {2: 0.5, 1: 0.45, 0: 0.05})  # L1 box says L2
    assert np.array_equal(assign_structures(probabilities, ORDER), labels)


def test_descending_order_is_respected():
    labels = stacked_boxes(levels=(5, 4, 3, 2, 1))
    probabilities = soft_probabilities(labels)
    set_probabilities(probabilities, box_slices(3), {4: 0.6, 2: 0.35, 0: 0.05})  # L2 box says L4
    order = {"axis": 0, "ascending": False, "labels": [5, 4, 3, 2, 1]}
    assert np.array_equal(assign_structures(probabilities, order), labels)
    assert np.all(assign_structures(probabilities)[box_slices(3)] == 4)


def test_fragment_joins_the_structure_it_overlaps_most_or_drops_with_min_voxels():
    labels = stacked_boxes()
    probabilities = soft_probabilities(labels)
    fragment = np.s_[21:26, 14:16, 14:16]  # beside L3 (2 slices of overlap) and L4 (1), says L4
    set_probabilities(probabilities, fragment, {4: 0.9, 0: 0.1})
    assert np.all(assign_structures(probabilities)[fragment] == 4)
    ordered = assign_structures(probabilities, ORDER)
    assert np.all(ordered[fragment] == 3)
    assert np.array_equal(np.where(ordered == 3, 0, ordered), np.where(labels == 3, 0, labels))
    dropped = assign_structures(probabilities, ORDER, min_voxels=25)
    assert np.array_equal(dropped, labels)


def test_fragment_between_structures_takes_a_free_label_or_the_nearer_neighbour():
    labels = stacked_boxes(levels=(1, 2, 3, 4, 0))
    probabilities = soft_probabilities(labels)
    beyond = np.s_[34:36, 14:16, 14:16]  # past L4, says L4: L5 is the only free label there
    between = np.s_[15:16, 14:16, 14:16]  # between L2 and L3 (nearer L2), says L5: none free
    set_probabilities(probabilities, beyond, {4: 0.9, 0: 0.1})
    set_probabilities(probabilities, between, {5: 0.9, 0: 0.1})
    unordered = assign_structures(probabilities)
    assert np.all(unordered[beyond] == 4) and np.all(unordered[between] == 5)
    ordered = assign_structures(probabilities, ORDER)
    assert np.all(ordered[beyond] == 5) and np.all(ordered[between] == 2)
    assert np.array_equal(ordered[labels > 0], labels[labels > 0])


def test_labels_outside_the_order_keep_their_best_label():
    labels = stacked_boxes()
    probabilities = soft_probabilities(labels)
    set_probabilities(probabilities, box_slices(1), {3: 0.6, 2: 0.35, 0: 0.05})  # L2 box says L3
    order = {"axis": 0, "ascending": True, "labels": [1, 2, 3, 4]}  # L5 is not ordered
    out = assign_structures(probabilities, order)
    assert np.array_equal(out, labels)
    reversed_order = {"axis": 0, "ascending": False, "labels": [5, 4]}  # L1..L3 untouched
    out = assign_structures(probabilities, reversed_order)
    assert np.all(out[box_slices(1)] == 3)
    assert np.all(out[box_slices(3)] == 5) and np.all(out[box_slices(4)] == 4)


def test_empty_prediction_gives_zeros():
    probabilities = np.zeros((N_LEVELS + 1, 40, 16, 16), np.float32)
    probabilities[0] = 1.0
    for order in (None, ORDER):
        out = assign_structures(probabilities, order, min_voxels=5)
        assert out.dtype == np.uint8 and out.shape == (40, 16, 16) and not out.any()


def test_detect_order_finds_axis_0_for_stacked_boxes():
    maps = [stacked_boxes(), stacked_boxes(levels=(0, 2, 3, 4, 5), start=3),
            stacked_boxes(levels=(1, 2, 3), shape=(30, 16, 16))]
    assert detect_structure_order(maps) == {"axis": 0, "ascending": True, "labels": [1, 2, 3, 4, 5]}
    flipped = [m[::-1] for m in maps]
    assert detect_structure_order(flipped) == {"axis": 0, "ascending": False, "labels": [5, 4, 3, 2, 1]}
    assert detect_structure_order([np.moveaxis(m, 0, 2) for m in maps])["axis"] == 2


def diagonal_boxes(drift):
    """Boxes 6 thick every 8 voxels along axis 0, 3 wide every ``drift`` voxels along axis 2."""
    labels = np.zeros((40, 16, 32), np.uint8)
    for level in range(1, 6):
        z0, x0 = 1 + (level - 1) * 8, 1 + (level - 1) * drift
        labels[z0:z0 + 6, 3:13, x0:x0 + 3] = level
    return labels


def test_detect_order_prefers_the_best_separated_axis():
    # Both axes order the boxes; separation gap / (sd_a + sd_b) is 2.3 along axis 0, and 1.2
    # or 3.7 along axis 2.
    assert detect_structure_order([diagonal_boxes(2)])["axis"] == 0
    assert detect_structure_order([diagonal_boxes(6)]) == {"axis": 2, "ascending": True,
                                                           "labels": [1, 2, 3, 4, 5]}


def test_detect_order_rejects_inconsistent_maps_and_single_structures():
    swapped = stacked_boxes(levels=(1, 3, 2, 4, 5))
    assert detect_structure_order([stacked_boxes(), swapped]) is None
    assert detect_structure_order([stacked_boxes(levels=(0, 0, 3, 0, 0))]) is None
    one_each = [stacked_boxes(levels=(1,)), stacked_boxes(levels=(0, 2))]
    assert detect_structure_order(one_each) is None  # no map shows two structures
    assert detect_structure_order([np.zeros((8, 8, 8), np.uint8)]) is None
    nested = np.zeros((20, 16, 16), np.uint8)  # centroids apart, but overlapping along every axis
    nested[2:18, 2:14, 2:14] = 1
    nested[11:15, 9:13, 9:13] = 2
    assert detect_structure_order([nested]) is None


def test_large_volume_is_fast():
    rng = np.random.default_rng(0)
    shape = (77, 224, 224)
    labels = np.zeros(shape, np.uint8)
    for level in range(1, 6):
        z0 = 2 + (level - 1) * 15
        labels[z0:z0 + 12, 60:160, 70:150] = level
    logits = rng.normal(0.0, 0.5, (6,) + shape).astype(np.float32)
    for channel in range(6):
        logits[channel] += 4.0 * (labels == channel)
    probabilities = np.exp(logits)
    probabilities /= probabilities.sum(axis=0)
    start = time.perf_counter()
    out = assign_structures(probabilities, ORDER, min_voxels=50)
    elapsed = time.perf_counter() - start
    assert out.dtype == np.uint8 and out.shape == shape
    assert elapsed < 3.0, f"{elapsed:.2f} s"
    inside = labels > 0
    assert np.mean(out[inside] == labels[inside]) > 0.99


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 4)), np.zeros((2, 3, 4, 4, 4))])
def test_probabilities_must_be_channels_first_3d(bad):
    with pytest.raises(ValueError):
        assign_structures(bad)


def test_an_extra_structure_beyond_the_chain_does_not_shift_the_levels():
    """Six objects for five levels (a thoracic vertebra above L1 that the model calls L1, L3 the
    smallest): the aligned chain keeps L1..L5 and lets the extra one join L1; the default chain
    (the five largest objects) drops L3 and shifts L1..L2 down by one level."""
    labels = np.zeros((52, 16, 16), np.uint8)
    extents = {0: (1, 7), 1: (9, 15), 2: (17, 23), 3: (25, 29), 4: (31, 37), 5: (39, 45)}
    for level, (z0, z1) in extents.items():
        labels[z0:z1, 3:13, 3:13] = level
    probabilities = soft_probabilities(labels)
    extra = np.s_[extents[0][0]:extents[0][1], 3:13, 3:13]
    set_probabilities(probabilities, extra, {1: 0.6, 0: 0.4})
    levels = labels > 0
    aligned = assign_structures(probabilities, ORDER, chain="aligned")
    assert np.array_equal(aligned[levels], labels[levels])
    assert np.all(aligned[extra] == 1)
    largest = assign_structures(probabilities, ORDER)  # the default chain
    assert np.all(largest[extra] == 1) and np.all(largest[9:15, 3:13, 3:13] == 2)
    with pytest.raises(ValueError, match="chain"):
        assign_structures(probabilities, ORDER, chain="longest")


def test_the_command_line_offers_every_labelling_rule():
    from ExtremeAugLogic.cli import build_parser
    from ExtremeAugLogic.inference import OBJECT_RULES
    args = build_parser().parse_args(["predict", "ws", "--image", "a.nii.gz", "--output", "b.nii.gz",
                                      "--objects", "ordered-aligned"])
    assert args.objects == "ordered-aligned"
    predict = next(a for a in build_parser()._subparsers._group_actions[0].choices["predict"]._actions
                   if a.dest == "objects")
    assert tuple(predict.choices) == OBJECT_RULES


# ---------------------------------------------------------------- objects as long as several levels

def merged_levels(first, last, thickness=6, gap=2):
    """Stacked boxes with the gaps between levels ``first``..``last`` (1-based) filled: one object."""
    labels = stacked_boxes()
    for level in range(first, last):
        z0 = 1 + level * (thickness + gap) - gap
        labels[z0:z0 + gap, 5:11, 5:11] = level  # a thinner bridge, as a disc between two bodies
    return labels


def test_an_object_as_long_as_three_levels_is_cut_into_three_before_the_order():
    """L3..L5 touch through their discs and the model calls all three L4: with the pitch (8 voxels
    between the boxes' centres) the object is cut at its two thinnest cross-sections into three
    parts, and the order gives them L3, L4 and L5; without it the three stay one object."""
    labels = merged_levels(3, 5)
    probabilities = soft_probabilities(labels)
    merged = np.s_[box_slices(2)[0].start:box_slices(4)[0].stop, 3:13, 3:13]
    set_probabilities(probabilities, (labels >= 3,), {4: 0.8, 3: 0.05, 5: 0.05, 0: 0.1})
    assert ndimage.label(probabilities.argmax(0) > 0)[1] == 3
    plain = assign_structures(probabilities, ORDER)
    assert len(np.unique(plain[merged][plain[merged] > 0])) == 1  # one label for three vertebrae
    cut = assign_structures(probabilities, ORDER, pitch=8.0)
    boxes = stacked_boxes() > 0  # the bridges may go either way
    assert np.array_equal(cut[boxes], labels[boxes])
    # the cuts fall in the bridges: each box is whole, the bridge voxels join a neighbour
    assert set(np.unique(cut[merged])) == {0, 3, 4, 5}


def test_the_cut_needs_the_order_and_spares_objects_shorter_than_one_and_a_half_pitches():
    labels = merged_levels(3, 5)
    probabilities = soft_probabilities(labels)
    assert np.array_equal(assign_structures(probabilities, None, pitch=8.0), assign_structures(probabilities))
    # two boxes joined are 14 voxels long: cut at pitch 8 (1.75 pitches), not at pitch 10 (1.4)
    two = merged_levels(2, 3)
    probabilities = soft_probabilities(two)
    joined = np.s_[box_slices(1)[0].start:box_slices(2)[0].stop, 3:13, 3:13]
    set_probabilities(probabilities, ((two == 2) | (two == 3),), {2: 0.85, 3: 0.05, 0: 0.1})
    boxes = stacked_boxes() > 0
    assert np.array_equal(assign_structures(probabilities, ORDER, pitch=8.0)[boxes], two[boxes])
    kept = assign_structures(probabilities, ORDER, pitch=10.0)
    assert len(np.unique(kept[joined][kept[joined] > 0])) == 1
    # a well separated prediction is unchanged by any pitch
    plain = soft_probabilities(stacked_boxes())
    assert np.array_equal(assign_structures(plain, ORDER, pitch=8.0), stacked_boxes())


def test_detect_order_gives_the_pitch_in_millimetres():
    maps = [stacked_boxes(), stacked_boxes(levels=(1, 2, 0, 4, 5))]  # a missing level: a double gap
    order = detect_structure_order(maps, spacings=[(1.0, 1.0, 1.0), (2.0, 1.0, 1.0)])
    # 4 gaps of 8 voxels of 1 mm; 3 of 8 voxels of 2 mm (2 -> 4: 16 voxels over two levels): mean of the 7
    assert order["pitch_mm"] == pytest.approx((4 * 8 + 3 * 16) / 7, abs=1e-3)
    assert "pitch_mm" not in detect_structure_order(maps)
    with pytest.raises(ValueError, match="spacings"):
        detect_structure_order(maps, spacings=[(1.0, 1.0, 1.0)])


def test_the_split_rule_converts_the_pitch_with_the_scan_spacing():
    from ExtremeAugLogic.errors import InputError
    from ExtremeAugLogic.inference import OBJECT_RULES, labels_from_probabilities

    labels = merged_levels(3, 5)
    probabilities = soft_probabilities(labels)
    set_probabilities(probabilities, (labels >= 3,), {4: 0.8, 3: 0.05, 5: 0.05, 0: 0.1})
    config = {"settings": {"objects": "ordered-split"}, "structure_order": {**ORDER, "pitch_mm": 16.0}}
    boxes = stacked_boxes() > 0
    assert "ordered-split" in OBJECT_RULES
    split = labels_from_probabilities(probabilities, config, spacing=(2.0, 1.0, 1.0))  # 16 mm = 8 voxels
    assert np.array_equal(split[boxes], labels[boxes])
    ordered = labels_from_probabilities(probabilities, config, "ordered", spacing=(2.0, 1.0, 1.0))
    for no_pitch in (labels_from_probabilities(probabilities, config),  # no spacing
                     labels_from_probabilities(probabilities, config, spacing=(1.0, 1.0, 1.0))):  # 16 voxels
        assert np.array_equal(no_pitch, ordered)
    with pytest.raises(InputError, match="objects"):
        labels_from_probabilities(probabilities, config, "split")


def shifted_chain():
    """Six bodies along axis 0: an unlabelled one above L1 (z 1-7) that the probabilities call L1,
    then L1..L5 (boxes 1..5) each called one level too high, L5 and the box below it both L5."""
    labels = np.zeros((52, 16, 16), np.uint8)
    for position in range(6):
        labels[box_slices(position)] = position  # box 0 is the unlabelled extra one
    probabilities = soft_probabilities(np.where(labels > 0, np.minimum(labels + 1, 5), 0))
    extra = box_slices(0)
    set_probabilities(probabilities, extra, {1: 0.9, 0: 0.1})
    return labels, probabilities, extra


def test_a_level_range_drops_the_body_beyond_the_first_level_and_mends_the_chain():
    labels, probabilities, extra = shifted_chain()
    centre = [np.mean([box_slices(p)[0].start, box_slices(p)[0].stop - 1]) for p in range(6)]
    plain = assign_structures(probabilities, ORDER)
    assert np.all(plain[extra] == 1) and np.all(plain[box_slices(1)] == 2)  # shifted by one
    ranged = assign_structures(probabilities, ORDER, level_range=(centre[1], centre[5]))
    assert np.all(ranged[extra] == 0)  # 1 pitch (8 voxels) above L1's expected centroid: not a level
    assert np.array_equal(ranged[labels > 0], labels[labels > 0])
    # within 0.75 pitch of the range the body stays; the range needs the order
    near = assign_structures(probabilities, ORDER, level_range=(centre[1] - 3, centre[5]))
    assert np.all(near[extra] > 0)
    assert np.array_equal(assign_structures(probabilities, level_range=(centre[1], centre[5])),
                          assign_structures(probabilities))


def test_a_level_range_that_would_leave_nothing_is_not_trusted():
    labels, probabilities, _ = shifted_chain()
    far = assign_structures(probabilities, ORDER, level_range=(200.0, 300.0))
    assert np.array_equal(far, assign_structures(probabilities, ORDER))


def chain_with_extra_bodies(extra_at=(), l5_thickness=4, top_gap=0, length=56):
    """Labels and probabilities: L1..L5 boxes (6 slices, 2 apart; L5 thinner, smaller than any
    extra body) from z ``top_gap`` + 8, each called one level too high, and extra unlabelled
    bodies ("top": the 6 slices from ``top_gap``, "bottom": the last 6 slices) that the
    probabilities call L1 and L5."""
    labels = np.zeros((length, 16, 16), np.uint8)
    for level in range(1, 6):
        z0 = top_gap + 8 * level
        labels[z0:z0 + (l5_thickness if level == 5 else 6), 3:13, 3:13] = level
    probabilities = soft_probabilities(np.where(labels > 0, np.minimum(labels + 1, 5), 0))
    extras = {"top": np.s_[top_gap:top_gap + 6, 3:13, 3:13], "bottom": np.s_[length - 6:, 3:13, 3:13]}
    for where in extra_at:
        set_probabilities(probabilities, extras[where], {1 if where == "top" else 5: 0.9, 0: 0.1})
    return labels, probabilities, [extras[where] for where in extra_at]


def test_a_body_cut_by_the_scan_edge_leaves_the_chain_as_background():
    """A T12 cut by the top of the scan, larger than L5 and called L1: before this rule the five
    largest objects made the chain and every level shifted by one; now the level cut by the
    field of view leaves the chain first and, lying beyond it, is background."""
    labels, probabilities, (top,) = chain_with_extra_bodies(["top"])
    out = assign_structures(probabilities, ORDER)
    assert np.all(out[top] == 0)
    assert np.array_equal(out[labels > 0], labels[labels > 0])
    before = assign_structures(probabilities, ORDER, chain="largest-parts")  # self-training's pseudo-labels
    assert np.all(before[top] == 1) and np.all(before[labels == 1] == 2)
    # the same at the other end (a sacrum cut by the bottom of the scan, called L5), and both at once
    for extra_at in (["bottom"], ["top", "bottom"]):
        labels, probabilities, extras = chain_with_extra_bodies(extra_at, l5_thickness=6)
        out = assign_structures(probabilities, ORDER)
        assert all(np.all(out[extra] == 0) for extra in extras), extra_at
        assert np.array_equal(out[labels > 0], labels[labels > 0]), extra_at


def test_an_extra_body_clear_of_the_edge_is_judged_by_size():
    """The same T12 two slices clear of the scan's edge (beyond 0.1 pitch: 0.8 voxel) is not cut
    by the field of view: the smallest level (L5) leaves the chain, as before the rule."""
    labels, probabilities, (top,) = chain_with_extra_bodies(["top"], top_gap=2, length=58)
    out = assign_structures(probabilities, ORDER)
    assert np.all(out[top] == 1)  # in the chain as L1: the shift this rule cannot see
    assert np.all(out[labels == 1] == 2)


def l5_found_in_part(l5_slices=1, l5_width=10):
    """The T12 cut by the scan's top (called L1) and L1..L4 whole, each called one level too high;
    of L5 only ``l5_slices`` slices of ``l5_width`` x 10 voxels, below L4 with no overlap."""
    labels, probabilities, (top,) = chain_with_extra_bodies(["top"], l5_thickness=l5_slices)
    labels[labels == 5] = 0
    labels[40:40 + l5_slices, 3:3 + l5_width, 3:13] = 5
    probabilities = soft_probabilities(np.where(labels > 0, np.minimum(labels + 1, 5), 0))
    set_probabilities(probabilities, top, {1: 0.9, 0: 0.1})
    return labels, probabilities, top


def test_a_piece_of_l5_makes_the_level_cut_by_the_edge_leave_the_chain():
    """Five large levels for five labels (T12 cut by the scan's edge, L1..L4) and L5 found only as
    a slice (1/6 of a body: a fragment): the piece beyond L4 counts as a level, so there are six
    and the one cut by the field of view leaves the chain. Without the piece every level shifts."""
    labels, probabilities, top = l5_found_in_part()
    out = assign_structures(probabilities, ORDER)
    assert np.all(out[top] == 0)
    assert np.array_equal(out[labels > 0], labels[labels > 0])
    without_l5 = probabilities.copy()
    set_probabilities(without_l5, np.nonzero(labels == 5), {0: 1.0})
    shifted = assign_structures(without_l5, ORDER)
    assert np.all(shifted[top] == 1) and np.all(shifted[labels == 1] == 2)


def test_a_speck_beyond_the_last_level_is_not_a_level():
    """A piece of L5 under 5 % of the largest body (20 voxels of 600) does not count: the chain
    stays as without it (shifted); nor does a piece when no level is cut by the field of view."""
    labels, probabilities, top = l5_found_in_part(l5_width=2)
    out = assign_structures(probabilities, ORDER)
    assert np.all(out[top] == 1) and np.all(out[labels == 1] == 2)
    labels, probabilities, (top,) = chain_with_extra_bodies(["top"], l5_thickness=1, top_gap=2, length=58)
    out = assign_structures(probabilities, ORDER)
    assert np.all(out[top] == 1)  # clear of the edge: the extra body stays in the chain as L1


def test_a_level_split_side_by_side_counts_once():
    """L3 predicted as two separate halves (left, right), each larger than a thin L5: the halves
    are one level, so L5 keeps its place in the chain and both halves are L3."""
    labels, _, _ = chain_with_extra_bodies([], l5_thickness=2)
    labels[24:30, 3:13, 8] = 0  # a cut through L3 along y: two halves of 6 x 10 x 5 voxels
    probabilities = soft_probabilities(labels)
    assert ndimage.label(labels == 3)[1] == 2 and (labels == 5).sum() < (labels == 3).sum() / 2
    out = assign_structures(probabilities, ORDER)
    assert np.array_equal(out[labels > 0], labels[labels > 0])


@pytest.mark.parametrize("rule, t12_label", [("ordered-largest", 1), ("as-predicted", 0)])
def test_pseudo_labels_follow_their_setting(rule, t12_label):
    """Self-training's pseudo-labels: the rule they were first measured with keeps a T12 cut by the
    scan's edge in the chain as L1; "as-predicted" labels them as a prediction is, T12 background."""
    from ExtremeAugLogic.inference.predict import pseudo_labels_from_probabilities

    labels, probabilities, (top,) = chain_with_extra_bodies(["top"])
    config = {"settings": {"objects": "ordered-split", "pseudo_label_rule": rule}, "structure_order": ORDER}
    out = pseudo_labels_from_probabilities(probabilities, config, spacing=(1.0, 1.0, 1.0))
    assert np.all(out[top] == t12_label)
    assert np.all(out[labels == 1] == (2 if t12_label else 1))
