"""The training process (``trainer``) and its chart (``plots``)."""

from ExtremeAugLogic.training.trainer import DEFAULT_MINUTES_CPU, DEFAULT_MINUTES_GPU, TrainRequest, train

__all__ = ["DEFAULT_MINUTES_CPU", "DEFAULT_MINUTES_GPU", "TrainRequest", "train"]
