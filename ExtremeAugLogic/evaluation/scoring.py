"""One way to score a model on labelled cases: used by validation, by the re-scoring of the
best model and by the experiments, so all three report the same numbers."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ExtremeAugLogic.evaluation.metrics import dice_scores
from ExtremeAugLogic.inference.predict import predict_array


def score_model(recipe, config, model, cases, device, level_guide=None) -> dict | None:
    """Dice of ``model`` on ``cases`` (objects with ``case_id``, ``image``, ``label``); None for no case.

    ``level_guide``: the model's ``inference.level_range.LevelGuide`` (its training scans), or None.
    Returns ``{"mean_dice", "binary_dice", "per_structure": {label: mean Dice},
    "per_case": {id: {"mean_dice", "binary_dice", "per_structure"}}, "cases": [ids]}``:
    means over the cases of each case's per-structure mean, binary (all structures as one)
    and per-structure Dice.
    """
    if not cases:
        return None
    labels = list(range(1, int(config["num_classes"])))
    per_case = {}
    for case in cases:
        prediction = predict_array(recipe, config, model, case.image, device, level_guide=level_guide)
        scores = dice_scores(prediction, sitk.GetArrayViewFromImage(case.label), labels=labels)
        per_case[case.case_id] = {"mean_dice": float(scores["mean_dice"]),
                                  "binary_dice": float(scores["binary_dice"]),
                                  "per_structure": {str(k): float(v) for k, v in scores["per_structure"].items()}}
    structures = sorted({k for c in per_case.values() for k in c["per_structure"]}, key=int)
    return {
        "mean_dice": float(np.mean([c["mean_dice"] for c in per_case.values()])),
        "binary_dice": float(np.mean([c["binary_dice"] for c in per_case.values()])),
        "per_structure": {k: float(np.mean([c["per_structure"].get(k, 0.0) for c in per_case.values()]))
                          for k in structures},
        "per_case": per_case,
        "cases": list(per_case),
    }
