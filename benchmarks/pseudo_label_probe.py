"""Are the pseudo-labels self-training would take named at the right levels? A probe on kept models.

    python benchmarks/pseudo_label_probe.py /tmp/generalisation-ours-vb*-* --out docs/results/generalisation-explore/x.json

Each work folder (kept by ``generalisation.py --keep --unlabeled``) holds one workspace; its last
trained model labels every worklist scan with self-training's rule (``pseudo_labels_from_probabilities``)
and the trainer's confidence measure (mean top probability inside the labelled structures). Per scan:
Dice of that pseudo-label against the true label (binary and per structure; a level-shifted label has
per-structure Dice far below binary), whether the scan joined the run's self-training, and, from the
training scan rigidly registered onto the scan (``level_range.LevelGuide``), how far (in pitches) the
registration puts the first and last structures from the pseudo-label's and from the truth's.

The final model stands in for the one that pseudo-labelled at 60 % of the budget: a proxy. Prints
one JSON line per scan and writes them all to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import require_data


def probe_folder(folder: Path, data: Path) -> list[dict]:
    import SimpleITK as sitk

    from ExtremeAugLogic.evaluation import dice_scores
    from ExtremeAugLogic.inference import load_model
    from ExtremeAugLogic.inference.level_range import LevelGuide, end_offsets
    from ExtremeAugLogic.inference.predict import pseudo_labels_from_probabilities
    from ExtremeAugLogic.workspace import Workspace
    from ExtremeAugLogic.workspace.imageio import case_spacing_zyx, read_image, read_label

    ws = Workspace.open(folder / "ws")
    train = ws.case_ids("train")[0]
    version = [v for v in ws.versions() if v.get("status") == "done"][-1]
    recipe, config, model, _ = load_model(ws, version["name"], "cpu")
    order = config["structure_order"]
    axis, labels = int(order["axis"]), [int(v) for v in order["labels"]]
    train_image = read_image(data / f"{train}_image.nii.gz")
    guide = LevelGuide([(train_image, read_label(data / f"{train}_label.nii.gz", reference=train_image))], order)
    joined = set(version.get("pseudo_labels", {}).get("used", []))
    rows = []
    for entry in ws.worklist_cases():
        case = entry["id"]
        image = read_image(data / f"{case}_image.nii.gz")
        truth = sitk.GetArrayFromImage(read_label(data / f"{case}_label.nii.gz", reference=image))
        probabilities = recipe.predict_probabilities(model, config, image, "cpu")
        pseudo = pseudo_labels_from_probabilities(probabilities, config, case_spacing_zyx(image))
        inside = pseudo > 0
        dice = dice_scores(pseudo, truth, labels)
        pitch = float(order["pitch_mm"]) / case_spacing_zyx(image)[axis]
        start = time.perf_counter()
        expected = guide.range_for(image)
        rows.append({"train": train, "case": case, "binary": dice["binary_dice"], "per": dice["mean_dice"],
                     "conf": float(probabilities.max(axis=0)[inside].mean()) if inside.any() else 0.0,
                     "joined": case in joined,
                     "reg_vs_pred": end_offsets(pseudo, expected, order, pitch) if expected else None,
                     "reg_vs_truth": end_offsets(truth, expected, order, pitch) if expected else None,
                     "reg_s": round(time.perf_counter() - start, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path, nargs="+", help="work folders kept by generalisation.py --keep --unlabeled")
    parser.add_argument("--set", default="spine-vb", help="the shared data folder (default spine-vb)")
    parser.add_argument("--out", type=Path, required=True, help="results (.json)")
    args = parser.parse_args(argv)
    data = require_data(args.set)
    rows = [row for folder in args.work for row in probe_folder(folder, data)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
