"""How much binary Dice a one-voxel outline costs, and how much of a model's error lies on the outline.

    python benchmarks/outline_ceiling.py --set vb                        # the references alone
    python benchmarks/outline_ceiling.py --set vb /tmp/bench-vb-abc ...  # and kept predictions

Part one scores every reference label of the set against itself shrunk and grown by one voxel
(SimpleITK's binary erosion and dilation, radius 1): the Dice of a prediction that is right
everywhere but one voxel inside or outside the outline. Part two reads folders of predictions
(``<case>_pred.nii.gz``, as ``one_scan.py`` leaves them in its work folder) and gives, per
folder, binary precision and recall and the share of the wrong voxels within 1 and 2 mm of the
reference outline (false positives: distance to the reference; false negatives: distance to its
background). Prints a Markdown report (``--out`` writes it). A probe for exploration.
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
             f"| grown by one voxel | {np.mean(grown):.3f} | {min(grown):.3f}-{max(grown):.3f} |"]
    if args.folders:
        lines += ["", "| predictions | scans | precision | recall | wrong voxels | within 1 mm of the outline |"
                  " within 2 mm |", "|---|---|---|---|---|---|---|"]
        for folder in args.folders:
            c = outline_errors(folder, data)
            wrong = max(c["fp"] + c["fn"], 1)
            lines.append(f"| {folder.name} | {', '.join(c['cases'])} | {c['tp'] / max(c['tp'] + c['fp'], 1):.3f} | "
                         f"{c['tp'] / max(c['tp'] + c['fn'], 1):.3f} | {c['fp'] + c['fn']} | "
                         f"{c['within_1mm'] / wrong:.2f} | {c['within_2mm'] / wrong:.2f} |")
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
