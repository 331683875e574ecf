"""Where the binary Dice of kept models is lost: wrong voxels sorted by where they lie.

    python benchmarks/error_breakdown.py /tmp/generalisation-ours-vb01-* ... --set vb --out docs/results/x.md

Each work folder (kept by ``generalisation.py --keep``) holds one workspace whose best model
predicts the scans of its worklist again (the model's own labelling rule). Every wrong voxel of
the binary map (all structures as one) is put in one class, the first that fits:

- false positives: **beyond** (in a predicted object whose centroid lies beyond the labelled
  levels along the order axis: a T12 or sacrum kept), **lateral** (in a slice along the slice axis
  where the reference has no foreground), **outline** (within ``--near-mm`` of the reference),
  **elsewhere**;
- false negatives: **missed level** (in a reference level of which the prediction covers under
  10 %), **outline** (within ``--near-mm`` of the prediction), **elsewhere**.

Writes a Markdown table per pair and the means (``.json`` beside it). A probe for exploration.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from common import require_data
from generalisation import SETS

CLASSES_FP = ("beyond", "lateral", "outline", "elsewhere")
CLASSES_FN = ("missed level", "outline", "elsewhere")


def distance_mm(mask: np.ndarray, spacing_zyx) -> np.ndarray:
    """Distance in mm of every voxel to ``mask`` (0 inside), SimpleITK's Maurer map."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    if not mask.any():
        return np.full(mask.shape, np.inf, np.float32)
    dist = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return np.maximum(sitk.GetArrayFromImage(dist), 0.0)


def breakdown(prediction: np.ndarray, reference: np.ndarray, spacing_zyx, order_axis: int, slice_axis: int,
              near_mm: float) -> dict:
    """Voxel counts of each class for one pair (label arrays in numpy order)."""
    from scipy import ndimage

    pred, ref = prediction > 0, reference > 0
    fp, fn = pred & ~ref, ~pred & ref
    out = {"tp": int((pred & ref).sum()), "fp": int(fp.sum()), "fn": int(fn.sum())}
    # beyond: predicted objects whose centroid lies outside the labelled levels' extent along the order axis
    ref_idx = np.nonzero(ref.any(axis=tuple(a for a in range(3) if a != order_axis)))[0]
    first, last = (ref_idx.min(), ref_idx.max()) if ref_idx.size else (0, -1)
    objects, count = ndimage.label(pred)
    beyond = np.zeros_like(pred)
    if count:
        coords = ndimage.center_of_mass(pred, objects, range(1, count + 1))
        for k, c in enumerate(coords, start=1):
            if not first <= c[order_axis] <= last:
                beyond |= objects == k
    lateral_slices = ~ref.any(axis=tuple(a for a in range(3) if a != slice_axis))
    shape = [1, 1, 1]
    shape[slice_axis] = -1
    lateral = np.broadcast_to(lateral_slices.reshape(shape), pred.shape)
    near_ref = distance_mm(ref, spacing_zyx) <= near_mm
    left = fp.copy()
    for name, where in (("beyond", beyond), ("lateral", lateral), ("outline", near_ref)):
        out[f"fp {name}"] = int((left & where).sum())
        left &= ~where
    out["fp elsewhere"] = int(left.sum())
    missed = np.zeros_like(ref)
    for level in np.unique(reference[reference > 0]):
        body = reference == level
        if (pred & body).sum() < 0.1 * body.sum():
            missed |= body
    near_pred = distance_mm(pred, spacing_zyx) <= near_mm
    left = fn.copy()
    for name, where in (("missed level", missed), ("outline", near_pred)):
        out[f"fn {name}"] = int((left & where).sum())
        left &= ~where
    out["fn elsewhere"] = int(left.sum())
    out["dice"] = 2 * out["tp"] / max(2 * out["tp"] + out["fp"] + out["fn"], 1)
    return out


def grown(seeds: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Hysteresis: ``seeds`` and every connected part of ``candidates`` that touches them."""
    from scipy import ndimage

    parts, count = ndimage.label(candidates | seeds)
    touching = np.unique(parts[seeds])
    return np.isin(parts, touching[touching > 0])


def probe_folder(folder: Path, data: Path, near_mm: float, thresholds=()) -> dict:
    import SimpleITK as sitk

    from ExtremeAugLogic.devices import resolve_device
    from ExtremeAugLogic.evaluation import dice_scores
    from ExtremeAugLogic.inference import labels_from_probabilities, load_model
    from ExtremeAugLogic.recipes.slice2d.preprocess import choose_slice_axis
    from ExtremeAugLogic.workspace import Workspace
    from ExtremeAugLogic.workspace.imageio import case_spacing_zyx, read_image, read_label

    ws = Workspace.open(folder / "ws")
    train_case = ws.case_ids("train")[0]
    device = resolve_device("cpu")
    recipe, config, model, _ = load_model(ws, ws.versions()[-1]["name"], device)
    order_axis = int(config["structure_order"]["axis"])
    results = {}
    for entry in ws.worklist_cases():
        case = entry["id"]
        image = read_image(data / f"{case}_image.nii.gz")
        reference = sitk.GetArrayFromImage(read_label(data / f"{case}_label.nii.gz", reference=image))
        probabilities = recipe.predict_probabilities(model, config, image, device)
        spacing = case_spacing_zyx(image)
        labels = labels_from_probabilities(probabilities, config, spacing=spacing)
        results[case] = breakdown(labels, reference, spacing, order_axis,
                                  choose_slice_axis(image, config.settings.get("slice_axis", "auto")), near_mm)
        for t in thresholds:  # binary Dice when only voxels with background probability below t stay foreground
            kept = (labels > 0) & (probabilities[0] < t) if t <= 0.5 else grown(labels > 0, probabilities[0] < t)
            results[case][f"dice bg<{t:g}"] = dice_scores(kept.astype(np.uint8), reference > 0, [1])["binary_dice"]
        print(f"{train_case} -> {case}: Dice {results[case]['dice']:.3f}", flush=True)
    return {"train_case": train_case, "pairs": results}


def render(runs: list[dict], near_mm: float) -> str:
    keys = [f"fp {c}" for c in CLASSES_FP] + [f"fn {c}" for c in CLASSES_FN]
    lines = ["# Where the binary Dice is lost", "",
             f"Shares of all wrong voxels (false positives + false negatives) per training scan; outline = within "
             f"{near_mm:g} mm of the other map. Precision and recall of the binary map.", "",
             "| training scan | binary Dice | precision | recall | " + " | ".join(keys) + " |",
             "|---" * (4 + len(keys)) + "|"]
    totals = {k: 0 for k in ["tp", "fp", "fn", *keys]}
    for run in runs:
        sums = {k: sum(p[k] for p in run["pairs"].values()) for k in totals}
        for k in totals:
            totals[k] += sums[k]
        lines.append(_row(run["train_case"], np.mean([p["dice"] for p in run["pairs"].values()]), sums, keys))
    dice = np.mean([p["dice"] for run in runs for p in run["pairs"].values()])
    lines.append(_row("**all**", dice, totals, keys))
    extra = sorted({k for run in runs for p in run["pairs"].values() for k in p if k.startswith("dice bg<")})
    if extra:
        lines += ["", "Binary Dice with another foreground rule: for t up to 0.5 only the labelled voxels whose background "
                  "probability is below t; above 0.5 the labelled voxels and the voxels below t connected to them:", "",
                  "| training scan | argmax | " + " | ".join(k[5:] for k in extra) + " |", "|---" * (2 + len(extra)) + "|"]
        for run in runs:
            pairs = run["pairs"].values()
            lines.append(f"| {run['train_case']} | {np.mean([p['dice'] for p in pairs]):.3f} | "
                         + " | ".join(f"{np.mean([p[k] for p in pairs]):.3f}" for k in extra) + " |")
        pairs = [p for run in runs for p in run["pairs"].values()]
        lines.append(f"| **all** | {np.mean([p['dice'] for p in pairs]):.3f} | "
                     + " | ".join(f"{np.mean([p[k] for p in pairs]):.3f}" for k in extra) + " |")
    return "\n".join(lines) + "\n"


def _row(name, dice, sums, keys) -> str:
    wrong = max(sums["fp"] + sums["fn"], 1)
    precision = sums["tp"] / max(sums["tp"] + sums["fp"], 1)
    recall = sums["tp"] / max(sums["tp"] + sums["fn"], 1)
    shares = " | ".join(f"{100 * sums[k] / wrong:.0f} %" for k in keys)
    return f"| {name} | {dice:.3f} | {precision:.3f} | {recall:.3f} | {shares} |"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, nargs="+", help="work folders kept by generalisation.py --keep")
    parser.add_argument("--set", choices=sorted(SETS), default="vb")
    parser.add_argument("--near-mm", type=float, default=2.0, help="the outline band (default 2 mm)")
    parser.add_argument("--background-below", type=float, nargs="*", default=[],
                        help="also score binary Dice keeping only foreground voxels whose background probability is below each "
                             "(above 0.5: adding the voxels below it connected to the labelled foreground)")
    parser.add_argument("--out", type=Path, required=True, help="the report (.md; its .json beside it)")
    args = parser.parse_args(argv)
    data = require_data(SETS[args.set]["folder"])
    start = time.time()
    runs = [probe_folder(folder, data, args.near_mm, args.background_below) for folder in args.work]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"near_mm": args.near_mm, "runs": runs}, indent=1))
    args.out.write_text(render(runs, args.near_mm) + f"\n{time.time() - start:.0f} s; command: `python "
                        + " ".join(sys.argv) + "`\n")
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
