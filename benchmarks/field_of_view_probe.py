"""Why a model trained from one scan names the wrong vertebral levels: a field-of-view probe.

Trains (or reuses) a model from one scan of a set, then predicts every other scan of the set
with part of its field of view blanked along the body axis (array axis 0): the top or the
bottom ``N`` mm set to 0 before prediction. If blanking the top mends the levels, the model
was misled by anatomy above the labelled structures that its training scan did not show whole.
Also scores two test-time averages of such predictions (each voxel averaged over the variants
that still see it): top cuts only, and top and bottom cuts alike.

    python benchmarks/field_of_view_probe.py --set vb --train-case vb07 --minutes 8 \
        --out docs/results/generalisation-explore/fov-probe-vb07.md
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import engine, machine, publish, require_data

SETS = {"vb": ("spine-vb", [f"vb{i:02d}" for i in range(1, 16)]),
        "ivd": ("spine-ivd", ["ivd11", "ivd20", "ivd25"])}
CUTS = [(0, 0), (20, 0), (40, 0), (0, 20), (0, 40)]  # (top mm, bottom mm) blanked
AVERAGES = {"average of top cuts": [(0, 0), (20, 0), (40, 0)], "average of top and bottom cuts": CUTS}


def _dice(labels: np.ndarray, reference: np.ndarray, values) -> tuple[float, float]:
    """(binary Dice, mean per-structure Dice over ``values``)."""
    def dice(a, b):
        total = a.sum() + b.sum()
        return 2.0 * (a & b).sum() / total if total else 1.0
    return dice(labels > 0, reference > 0), float(np.mean([dice(labels == v, reference == v) for v in values]))


def probe(workspace: Path, folder: Path, cases: list[str]) -> dict:
    """{case: {variant: (binary, per-structure)}} for every case, with the workspace's best model."""
    import SimpleITK as sitk

    from ExtremeAugLogic.inference.predict import labels_from_probabilities, load_model
    from ExtremeAugLogic.workspace.imageio import case_spacing_zyx
    from ExtremeAugLogic.workspace import Workspace

    recipe, config, model, _ = load_model(Workspace(workspace), None, "cpu")
    results = {}
    for case in cases:
        image = sitk.ReadImage(str(folder / f"{case}_image.nii.gz"))
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{case}_label.nii.gz")))
        values = [int(v) for v in np.unique(reference) if v > 0]
        array = sitk.GetArrayFromImage(image)
        spacing = image.GetSpacing()[2]  # array axis 0 is the image's third axis
        predicted = {}
        for top, bottom in CUTS:
            rows_top, rows_bottom = int(round(top / spacing)), int(round(bottom / spacing))
            cut = array.copy()
            seen = np.ones(array.shape[0], np.float32)
            cut[:rows_top], seen[:rows_top] = 0, 0
            if rows_bottom:
                cut[-rows_bottom:], seen[-rows_bottom:] = 0, 0
            cut_image = sitk.GetImageFromArray(cut)
            cut_image.CopyInformation(image)
            predicted[(top, bottom)] = (recipe.predict_probabilities(model, config, cut_image, "cpu"), seen)
        row = {}
        for top, bottom in CUTS:
            labels = labels_from_probabilities(predicted[(top, bottom)][0], config, spacing=case_spacing_zyx(image))
            row[f"top {top} mm, bottom {bottom} mm blanked"] = _dice(labels, reference, values)
        for name, variants in AVERAGES.items():
            total = sum(predicted[v][0] * predicted[v][1][None, :, None, None] for v in variants)
            weight = sum(predicted[v][1] for v in variants)[None, :, None, None]
            labels = labels_from_probabilities(total / np.maximum(weight, 1e-6), config, spacing=case_spacing_zyx(image))
            row[name] = _dice(labels, reference, values)
        results[case] = row
        print(case, {k: f"{b:.3f}/{s:.3f}" for k, (b, s) in row.items()}, flush=True)
    return results


def report(results: dict, args, command: str) -> str:
    variants = list(next(iter(results.values())))
    lines = [f"# Field-of-view probe: {args.set}, trained from {args.train_case}", "",
             f"- command: `{command}`", f"- machine: {machine()}",
             f"- model: {args.train_case} alone, engine defaults, "
             + (f"{args.minutes:g} min" if args.workspace is None else f"workspace {args.workspace}"),
             "- each cell: binary Dice / per-structure Dice on one unseen scan; the blanked part of the "
             "field of view is set to 0 before prediction (and scored as predicted)", "",
             "| scan | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
    for case, row in results.items():
        lines.append(f"| {case} | " + " | ".join(f"{b:.3f} / {s:.3f}" for b, s in row.values()) + " |")
    means = {v: np.mean([row[v] for row in results.values()], axis=0) for v in variants}
    lines.append("| **mean** | " + " | ".join(f"**{b:.3f} / {s:.3f}**" for b, s in means.values()) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=sorted(SETS), default="vb")
    parser.add_argument("--train-case", required=True)
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--workspace", help="reuse this workspace's best model instead of training")
    parser.add_argument("--out")
    args = parser.parse_args()
    folder_name, cases = SETS[args.set]
    folder = require_data(folder_name)
    if args.train_case not in cases:
        sys.exit(f"--train-case {args.train_case}: not a case of the {args.set} set ({', '.join(cases)})")
    with tempfile.TemporaryDirectory() as scratch:
        workspace = Path(args.workspace) if args.workspace else Path(scratch) / "ws"
        if not args.workspace:
            for step in (["init", workspace],
                         ["add", workspace, "--image", folder / f"{args.train_case}_image.nii.gz",
                          "--label", folder / f"{args.train_case}_label.nii.gz", "--case-id", args.train_case],
                         ["train", workspace, "--minutes", args.minutes, "--no-predict-worklist"]):
                subprocess.run(engine(*step), check=True, capture_output=True)
        results = probe(workspace, folder, [c for c in cases if c != args.train_case])
    command = "python benchmarks/field_of_view_probe.py " + " ".join(sys.argv[1:])
    publish(report(results, args, command), args.out)


if __name__ == "__main__":
    main()
