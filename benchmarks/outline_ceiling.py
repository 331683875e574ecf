"""How much binary Dice a one-voxel outline costs, and how much of a model's error lies on the outline.

    python benchmarks/outline_ceiling.py --set vb                        # the references alone
    python benchmarks/outline_ceiling.py --set vb /tmp/bench-vb-abc ...  # and kept predictions

Part one scores every reference label of the set against itself shrunk and grown by one voxel
(SimpleITK's binary erosion and dilation, radius 1): the Dice of a prediction that is right
everywhere but one voxel inside or outside the outline. Part two reads folders of predictions
(``<case>_pred.nii.gz``, as ``one_scan.py`` leaves them in its work folder) and gives, per
folder, binary precision and recall and the share of the wrong voxels within 1 and 2 mm of the
reference outline (false positives: distance to the reference; false negatives: distance to its
background). Part three asks how the references were drawn: whether each is built from every k-th
slice along one axis (the drawn slices), the k - 1 slices between two drawn ones all equal to the
larger label of the two (``drawn_slices``); where they are, the predictions are also scored on the
drawn slices alone, and after being rebuilt the same way from their own drawn slices. Prints a
Markdown report (``--out`` writes it). A probe for exploration.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from common import machine, publish, require_data
from error_breakdown import distance_mm
from generalisation import SETS


def one_voxel_dice(reference) -> tuple[float, float]:
    """Binary Dice of a reference label image with itself shrunk, and grown, by one voxel."""
    import SimpleITK as sitk
    from ExtremeAugLogic.workspace.overlap import dice

    ref = reference > 0
    r = sitk.GetArrayFromImage(ref) > 0
    shrunk = sitk.GetArrayFromImage(sitk.BinaryErode(ref, [1, 1, 1])) > 0
    grown = sitk.GetArrayFromImage(sitk.BinaryDilate(ref, [1, 1, 1])) > 0
    return dice(shrunk, r), dice(grown, r)


def rebuilt_from(label: np.ndarray, axis: int, step: int) -> np.ndarray:
    """``label`` with the slices between every ``step``-th slice along ``axis`` (from slice 0)
    replaced by the larger label of the two drawn slices around them; the slices after the last
    drawn one stay as they are."""
    out = np.moveaxis(label.copy(), axis, 0)
    source = np.moveaxis(label, axis, 0)
    for first in range(0, len(source) - step, step):
        out[first + 1:first + step] = np.maximum(source[first], source[first + step])
    return np.moveaxis(out, 0, axis)


def drawn_slices(label: np.ndarray, steps=(2, 3, 4, 5, 6)) -> tuple[int, int] | None:
    """(axis, step) when ``label`` equals itself rebuilt from every step-th slice along axis
    (the largest such step, since a label drawn every 4th slice is also one drawn every 2nd; slice 0 is
    a drawn one), else None. An empty label is drawn nowhere."""
    if not label.any():
        return None
    for axis in range(label.ndim):
        for step in sorted(steps, reverse=True):
            if label.shape[axis] > 2 * step and np.array_equal(rebuilt_from(label, axis, step), label):
                return axis, step
    return None


def how_drawn(drawn_by_case: dict) -> str:
    """One line on how the references were drawn, the cases grouped by their ``drawn_slices``."""
    groups: dict[str, list[str]] = {}
    for case, drawn in drawn_by_case.items():
        text = (f"one slice in {drawn[1]} along array axis {drawn[0]}, the slices between two drawn ones "
                "the larger label of the two" if drawn else "slice by slice")
        groups.setdefault(text, []).append(case)
    return "; ".join(f"{', '.join(cases)} ({len(cases)} of {len(drawn_by_case)}): {text}"
                     for text, cases in groups.items())


def outline_errors(folder: Path, references: dict, drawn_by_case: dict) -> dict:
    """Precision, recall and where the wrong voxels lie, over every prediction in ``folder``; and per
    prediction whose reference has drawn slices, (binary Dice, Dice on the drawn slices alone, Dice of
    the prediction rebuilt from its own drawn slices) under ``"drawn"``."""
    from ExtremeAugLogic.workspace.imageio import case_spacing_zyx, read_label
    from ExtremeAugLogic.workspace.overlap import dice
    import SimpleITK as sitk

    counts = {"tp": 0, "fp": 0, "fn": 0, "within_1mm": 0, "within_2mm": 0, "cases": [], "drawn": []}
    for pred_path in sorted(folder.glob("*_pred.nii.gz")):
        case = pred_path.name[:-len("_pred.nii.gz")]
        ref_image = references[case]
        ref = sitk.GetArrayFromImage(ref_image) > 0
        pred = sitk.GetArrayFromImage(read_label(pred_path, allow_empty=True)) > 0
        spacing = case_spacing_zyx(ref_image)
        fp, fn = pred & ~ref, ~pred & ref
        to_outline = np.where(fp, distance_mm(ref, spacing), 0.0) + np.where(fn, distance_mm(~ref, spacing), 0.0)
        wrong = fp | fn
        counts["tp"] += int((pred & ref).sum())
        counts["fp"] += int(fp.sum())
        counts["fn"] += int(fn.sum())
        counts["within_1mm"] += int((wrong & (to_outline <= 1.0)).sum())
        counts["within_2mm"] += int((wrong & (to_outline <= 2.0)).sum())
        counts["cases"].append(case)
        if drawn_by_case[case]:  # on foreground masks the larger label of two slices is their union
            axis, step = drawn_by_case[case]
            on_drawn = [slice(None)] * ref.ndim
            on_drawn[axis] = slice(0, None, step)
            counts["drawn"].append((dice(pred, ref), dice(pred[tuple(on_drawn)], ref[tuple(on_drawn)]),
                                    dice(rebuilt_from(pred, axis, step), ref)))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", type=Path, nargs="*", help="folders of <case>_pred.nii.gz predictions")
    parser.add_argument("--set", choices=sorted(SETS), default="vb")
    parser.add_argument("--out", help="write the markdown report here")
    args = parser.parse_args()
    data = require_data(SETS[args.set]["folder"])

    import SimpleITK as sitk
    from ExtremeAugLogic.workspace.imageio import read_label

    references = {p.name[:-len("_label.nii.gz")]: read_label(p) for p in sorted(data.glob("*_label.nii.gz"))}
    drawn_by_case = {case: drawn_slices(sitk.GetArrayFromImage(image)) for case, image in references.items()}
    shells = {case: one_voxel_dice(image) for case, image in references.items()}
    shrunk = [s for s, _ in shells.values()]
    grown = [g for _, g in shells.values()]
    lines = [f"# What a one-voxel outline costs: {args.set}", "", f"- machine: {machine()}",
             f"- command: `python benchmarks/outline_ceiling.py --set {args.set}"
             + (" FOLDER ..." if args.folders else "") + "`", "",
             "| each reference against itself | mean binary Dice | range over the scans |", "|---|---|---|",
             f"| shrunk by one voxel | {np.mean(shrunk):.3f} | {min(shrunk):.3f}-{max(shrunk):.3f} |",
             f"| grown by one voxel | {np.mean(grown):.3f} | {min(grown):.3f}-{max(grown):.3f} |", "",
             "How the references were drawn: " + how_drawn(drawn_by_case) + "."]
    if args.folders:
        lines += ["", "| predictions | scans | precision | recall | wrong voxels | within 1 mm of the outline |"
                  " within 2 mm |", "|---|---|---|---|---|---|---|"]
        errors = {folder.name: outline_errors(folder, references, drawn_by_case) for folder in args.folders}
        for name, c in errors.items():
            wrong = max(c["fp"] + c["fn"], 1)
            lines.append(f"| {name} | {', '.join(c['cases'])} | {c['tp'] / max(c['tp'] + c['fp'], 1):.3f} | "
                         f"{c['tp'] / max(c['tp'] + c['fn'], 1):.3f} | {c['fp'] + c['fn']} | "
                         f"{c['within_1mm'] / wrong:.2f} | {c['within_2mm'] / wrong:.2f} |")
        if any(c["drawn"] for c in errors.values()):
            lines += ["", "| predictions | scans with drawn slices | binary Dice | on the drawn slices alone |"
                      " rebuilt from its own drawn slices like the reference |", "|---|---|---|---|---|"]
        for name, c in errors.items():
            if c["drawn"]:
                mean = np.mean(c["drawn"], axis=0)
                lines.append(f"| {name} | {len(c['drawn'])} | {mean[0]:.3f} | {mean[1]:.3f} | {mean[2]:.3f} |")
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
