"""The interface every model family (2D paper model, 3D MSD model) implements.

The training process (``training.py``) and prediction (``inference.py``) only talk to a
``Recipe``; each recipe decides how cases become batches and how a scan becomes
class probabilities. A recipe's ``config`` is plain JSON, stored with each model version,
and holds everything needed to rebuild the network and its preprocessing at predict time.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np


@dataclass
class CaseData:
    """One training or validation case in memory (SimpleITK images on the same grid)."""

    case_id: str
    image: "SimpleITK.Image"  # noqa: F821  float32, 3D
    label: "SimpleITK.Image"  # noqa: F821  integer labels 0..K, same grid


ProgressCallback = Optional[Callable[[int, int], None]]


class Recipe(abc.ABC):
    """How one model family trains and predicts.

    ``settings`` are the user's choices (level, batch size, patch size, ...), already
    merged with the recipe's defaults by ``default_settings``.
    """

    kind: str = ""

    def __init__(self, settings: dict):
        self.settings = {**self.default_settings(), **(settings or {})}

    @classmethod
    def default_settings(cls) -> dict:
        """Defaults for this family; overridden per recipe."""
        return {}

    @abc.abstractmethod
    def fit_config(self, cases: list[CaseData], num_classes: int) -> dict:
        """Derive the JSON config (preprocessing, network shape) from the training cases."""

    @abc.abstractmethod
    def build_model(self, config: dict):
        """Return a fresh ``torch.nn.Module`` for ``config``."""

    @abc.abstractmethod
    def make_sampler(self, config: dict, cases: list[CaseData], device, seed: int):
        """Return an object whose ``batch(step)`` gives ``(x, y)`` tensors on ``device``.

        ``x`` is float (B, 1, *patch), ``y`` is long (B, 1, *patch) with values 0..K.
        Memory must not grow with the augmentation level.
        """

    @abc.abstractmethod
    def loss_function(self, config: dict) -> Callable:
        """Return ``loss(outputs, y)``; ``outputs`` is what the model returns in train mode."""

    def optimizer(self, model, config: dict):
        """Return ``(optimizer, scheduler_or_None)``; the scheduler is stepped every iteration."""
        import torch

        lr = float(self.settings.get("learning_rate", 1e-3))
        return torch.optim.Adam(model.parameters(), lr=lr), None

    @abc.abstractmethod
    def predict_probabilities(self, model, config: dict, image, device, tta: bool = False,
                              progress: ProgressCallback = None) -> np.ndarray:
        """Class probabilities (K+1, z, y, x) as float32 on ``image``'s own grid (array order)."""
