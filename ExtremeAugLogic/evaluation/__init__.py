"""Segmentation quality: ``metrics`` (Dice, HD95, changed voxels) and ``scoring`` (a model on cases)."""

from ExtremeAugLogic.evaluation.metrics import (changed_voxels, dice_scores, evaluate, evaluate_files, format_report,
                                                hausdorff95)
from ExtremeAugLogic.evaluation.scoring import score_model

__all__ = ["changed_voxels", "dice_scores", "evaluate", "evaluate_files", "format_report", "hausdorff95",
           "score_model"]
