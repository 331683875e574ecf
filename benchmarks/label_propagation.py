"""How good is a delineation carried onto another scan by registration? A probe of the generalisation
issue's third semi-supervised candidate (label propagation as extra training pairs).

    python benchmarks/label_propagation.py --set vb --train vb01 vb13 --targets vb04 vb08 vb11 vb15

Each training scan is registered onto each target scan: rigidly first (the engine's
``level_range.rigid_transform``, Mattes mutual information at a quarter resolution), then with a
cubic B-spline (4 x 4 x 4 control-point mesh, mutual information on a 20 % random sample, L-BFGS-B,
50 steps at a quarter and at half resolution). Its label, warped by nearest neighbour, is scored
against the target's own reference (binary and per-structure Dice), with the time each
registration took. A label propagated this way would be a training pair for the target scan; it is
worth training on only where it beats what the model's own pseudo-labels give. Prints a Markdown
report (``--out`` writes it).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common import machine, publish, require_data
from generalisation import SETS

MESH = 4
SHRINK_FACTORS = (4, 2)
SMOOTHING_MM = (2.0, 1.0)
STEPS = 50
SAMPLE_SHARE = 0.2


def bspline_transform(fixed, moving, start):
    """``start`` (fixed -> moving) refined by a cubic B-spline, mutual information (SimpleITK)."""
    import SimpleITK as sitk

    fixed, moving = sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32)
    spline = sitk.BSplineTransformInitializer(fixed, [MESH] * 3, order=3)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(SAMPLE_SHARE, seed=1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=STEPS,
                                maximumNumberOfCorrections=5)
    method.SetShrinkFactorsPerLevel(list(SHRINK_FACTORS))
    method.SetSmoothingSigmasPerLevel(list(SMOOTHING_MM))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetMovingInitialTransform(start)
    method.SetInitialTransform(spline, inPlace=True)
    method.Execute(fixed, moving)
    return sitk.CompositeTransform([start, spline])


def carried_over(label, fixed, transform) -> np.ndarray:
    """``label`` warped onto ``fixed``'s grid by ``transform`` (nearest neighbour), as an array."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.Resample(label, fixed, transform, sitk.sitkNearestNeighbor, 0,
                                                label.GetPixelID()))


def timed(work):
    """(what ``work()`` returns, the seconds it took)."""
    began = time.perf_counter()
    return work(), time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=sorted(SETS), default="vb")
    parser.add_argument("--train", nargs="+", required=True, help="the delineated scans whose labels are carried over")
    parser.add_argument("--targets", nargs="+", required=True, help="the scans they are carried onto")
    parser.add_argument("--out", help="write the markdown report here")
    args = parser.parse_args()
    data = require_data(SETS[args.set]["folder"])

    import SimpleITK as sitk
    from ExtremeAugLogic.inference.level_range import rigid_transform
    from ExtremeAugLogic.workspace.imageio import read_image, read_label
    from ExtremeAugLogic.workspace.overlap import dice_scores

    rows = []  # per pair: name, rigid s, rigid binary, rigid per-structure, B-spline s, B-spline binary, per-structure
    for source in args.train:
        image, label = read_image(data / f"{source}_image.nii.gz"), read_label(data / f"{source}_label.nii.gz")
        structures = [int(s) for s in np.unique(sitk.GetArrayViewFromImage(label)) if s > 0]
        for target in (t for t in args.targets if t != source):
            fixed = read_image(data / f"{target}_image.nii.gz")
            reference = sitk.GetArrayFromImage(read_label(data / f"{target}_label.nii.gz"))
            rigid, rigid_s = timed(lambda: rigid_transform(fixed, image))
            spline, spline_s = timed(lambda: bspline_transform(fixed, image, rigid))
            row = [f"{source} -> {target}"]
            for transform, seconds in ((rigid, rigid_s), (spline, spline_s)):
                dice = dice_scores(carried_over(label, fixed, transform), reference, structures)
                row += [seconds, dice["binary_dice"], dice["mean_dice"]]
            rows.append(row)
            print(f"{row[0]}: rigid {row[2]:.3f} / {row[3]:.3f}, B-spline {row[5]:.3f} / {row[6]:.3f} "
                  f"({row[1]:.1f} s + {row[4]:.1f} s)", flush=True)
    lines = [f"# Labels carried onto other scans by registration: {args.set}", "", f"- machine: {machine()}",
             f"- command: `python benchmarks/label_propagation.py --set {args.set} --train {' '.join(args.train)} "
             f"--targets {' '.join(args.targets)}`", "",
             "| pair | rigid: binary / per-structure Dice | + B-spline: binary / per-structure Dice | rigid s | B-spline s |",
             "|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[2]:.3f} / {r[3]:.3f} | {r[5]:.3f} / {r[6]:.3f} | {r[1]:.1f} | {r[4]:.1f} |" for r in rows]
    if rows:
        a = np.array([r[1:] for r in rows], dtype=float)
        lines.append(f"| **mean of {len(rows)}** | **{a[:, 1].mean():.3f} / {a[:, 2].mean():.3f}** | "
                     f"**{a[:, 4].mean():.3f} / {a[:, 5].mean():.3f}** | {a[:, 0].mean():.1f} | {a[:, 3].mean():.1f} |")
        lines.append(f"| worst | {a[:, 1].min():.3f} / {a[:, 2].min():.3f} | {a[:, 4].min():.3f} / {a[:, 5].min():.3f} | | |")
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
