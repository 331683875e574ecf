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


def one_voxel_dice(label_path: Path) -> tuple[float, float]:
    """Binary Dice of a reference with itself shrunk, and grown, by one voxel."""
    import SimpleITK as sitk
    from ExtremeAugLogic.workspace.overlap import dice

    ref = sitk.ReadImage(str(label_path)) > 0
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


def how_drawn(label_paths: list[Path]) -> str:
    """One line on how the references were drawn, the cases grouped by ``drawn_slices``."""
    import SimpleITK as sitk

    groups: dict[str, list[str]] = {}
    for path in label_paths:
        drawn = drawn_slices(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))
        text = (f"one slice in {drawn[1]} along array axis {drawn[0]}, the slices between two drawn ones "
                "the larger label of the two" if drawn else "slice by slice")
        groups.setdefault(text, []).append(path.name[:-len("_label.nii.gz")])
    return "; ".join(f"{', '.join(cases)} ({len(cases)} of {len(label_paths)}): {text}" for text, cases in groups.items())


def drawn_slice_scores(folder: Path, data: Path) -> list[tuple[str, float, float, float]]:
    """Per prediction whose reference has drawn slices: (case, binary Dice, Dice on the drawn
    slices alone, Dice of the prediction rebuilt from its own drawn slices)."""
    import SimpleITK as sitk
    from ExtremeAugLogic.workspace.imageio import read_label
    from ExtremeAugLogic.workspace.overlap import dice

    rows = []
    for pred_path in sorted(folder.glob("*_pred.nii.gz")):
        case = pred_path.name[:-len("_pred.nii.gz")]
        ref = sitk.GetArrayFromImage(read_label(data / f"{case}_label.nii.gz"))
        drawn = drawn_slices(ref)
        if drawn is None:
            continue
        axis, step = drawn
        pred = sitk.GetArrayFromImage(read_label(pred_path, allow_empty=True))
        on_drawn = [slice(None)] * ref.ndim
        on_drawn[axis] = slice(0, None, step)
        rows.append((case, dice(pred > 0, ref > 0),
                     dice(pred[tuple(on_drawn)] > 0, ref[tuple(on_drawn)] > 0),
                     dice(rebuilt_from(pred, axis, step) > 0, ref > 0)))
    return rows


def outline_errors(folder: Path, data: Path) -> dict:
    """Precision, recall and where the wrong voxels lie, over every prediction in ``folder``."""
    from ExtremeAugLogic.workspace.imageio import case_spacing_zyx, read_label
    import SimpleITK as sitk

    counts = {"tp": 0, "fp": 0, "fn": 0, "within_1mm": 0, "within_2mm": 0, "cases": []}
    for pred_path in sorted(folder.glob("*_pred.nii.gz")):
        case = pred_path.name[:-len("_pred.nii.gz")]
        ref_image = read_label(data / f"{case}_label.nii.gz")
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
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", type=Path, nargs="*", help="folders of <case>_pred.nii.gz predictions")
    parser.add_argument("--set", choices=sorted(SETS), default="vb")
    parser.add_argument("--out", help="write the markdown report here")
    args = parser.parse_args()
    data = require_data(SETS[args.set]["folder"])

    labels = sorted(data.glob("*_label.nii.gz"))
    shells = {p.name[:-len("_label.nii.gz")]: one_voxel_dice(p) for p in labels}
    shrunk = [s for s, _ in shells.values()]
    grown = [g for _, g in shells.values()]
    lines = [f"# What a one-voxel outline costs: {args.set}", "", f"- machine: {machine()}",
             f"- command: `python benchmarks/outline_ceiling.py --set {args.set}"
             + (" FOLDER ..." if args.folders else "") + "`", "",
             "| each reference against itself | mean binary Dice | range over the scans |", "|---|---|---|",
             f"| shrunk by one voxel | {np.mean(shrunk):.3f} | {min(shrunk):.3f}-{max(shrunk):.3f} |",
             f"| grown by one voxel | {np.mean(grown):.3f} | {min(grown):.3f}-{max(grown):.3f} |", "",
             "How the references were drawn: " + how_drawn(labels) + "."]
    if args.folders:
        lines += ["", "| predictions | scans | precision | recall | wrong voxels | within 1 mm of the outline |"
                  " within 2 mm |", "|---|---|---|---|---|---|---|"]
        for folder in args.folders:
            c = outline_errors(folder, data)
            wrong = max(c["fp"] + c["fn"], 1)
            lines.append(f"| {folder.name} | {', '.join(c['cases'])} | {c['tp'] / max(c['tp'] + c['fp'], 1):.3f} | "
                         f"{c['tp'] / max(c['tp'] + c['fn'], 1):.3f} | {c['fp'] + c['fn']} | "
                         f"{c['within_1mm'] / wrong:.2f} | {c['within_2mm'] / wrong:.2f} |")
        drawn_rows = {folder.name: drawn_slice_scores(folder, data) for folder in args.folders}
        if any(drawn_rows.values()):
            lines += ["", "| predictions | scans with drawn slices | binary Dice | on the drawn slices alone |"
                      " rebuilt from its own drawn slices like the reference |", "|---|---|---|---|---|"]
        for name, rows in drawn_rows.items():
            if rows:
                mean = np.mean([r[1:] for r in rows], axis=0)
                lines.append(f"| {name} | {len(rows)} | {mean[0]:.3f} | {mean[1]:.3f} | {mean[2]:.3f} |")
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
