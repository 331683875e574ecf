"""The interface every model family (2D paper model, 3D MSD model) implements.

Training (``training/``) and prediction (``inference/``) only talk to a ``Recipe``; each
recipe decides how cases become batches and how a scan becomes class probabilities. A
recipe's config is plain JSON, stored with each model version as ``config.json``, and holds
everything needed to rebuild the network and its preprocessing at predict time; code reads
it through ``RecipeConfig``. Settings are read from the config, never from the recipe
object, once the config exists.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from ExtremeAugLogic.errors import InputError
from ExtremeAugLogic.workspace.workspace import CaseData

ProgressCallback = Optional[Callable[[int, int], None]]

__all__ = ["CaseData", "PreparedCase", "ProgressCallback", "Recipe", "RecipeConfig", "pseudo_label_fractions",
           "stream_seed"]

_MASK64 = 0xFFFFFFFFFFFFFFFF


def pseudo_label_fractions(settings: dict) -> tuple[float, ...]:
    """The fractions of the budget at which self-training labels the worklist, in order.

    ``pseudo_label_at`` is one number or a list of strictly increasing numbers, each in (0, 1);
    anything else is refused with one line.
    """
    value = settings.get("pseudo_label_at", 0.6)
    values = value if isinstance(value, (list, tuple)) else [value]
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not values or not numbers or not all(0.0 < v < 1.0 for v in values) \
            or any(b <= a for a, b in zip(values, values[1:])):
        raise InputError(f"pseudo_label_at must be a fraction in (0, 1) or a list of increasing ones, not {value!r}")
    return tuple(float(v) for v in values)


def stream_seed(seed: int, rank: int = 0) -> int:
    """The seed of one training process's random draws: ``seed`` itself on rank 0, a mixed one elsewhere.

    Every rank of a training on several processes draws its own batches (which base patch,
    which of its transforms, the fresh transforms of level 0, intensity changes); rank 0, and
    so a training on one process, draws exactly the stream it drew before there were ranks.
    The fixed transforms of level N are not keyed by rank: they are the level-N data set,
    the same on every rank, so level N means N transforms per base patch on any number of
    processes.
    """
    if int(rank) == 0:
        return int(seed)
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(rank) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & (_MASK64 >> 1)


class RecipeConfig(dict):
    """A model version's config: the plain JSON dict, with its common fields as properties."""

    @property
    def kind(self) -> str:
        return str(self["kind"])

    @property
    def num_classes(self) -> int:
        """Output classes including the background (K + 1)."""
        return int(self["num_classes"])

    @property
    def settings(self) -> dict:
        return self["settings"]

    @property
    def structure_labels(self) -> list[int]:
        """The label values 1..K the model predicts."""
        return list(range(1, self.num_classes))


@dataclass
class PreparedCase:
    """A scan (and label) as the network sees it, plus what maps it back to the scan's grid.

    2D: ``image`` and ``label`` are stacks of square slices (S, H, W), ``geometry`` the slice
    plan. 3D: ``image`` and ``label`` are the resampled volume (Z, Y, X), ``geometry`` the
    reference image of that grid.
    """

    image: np.ndarray
    label: Optional[np.ndarray]
    geometry: Any


class Recipe(abc.ABC):
    """How one model family trains and predicts.

    A subclass sets ``kind`` (one of ``contract.MODEL_KINDS``) and defines every abstract
    method below; ``recipes.registry.register_recipe`` checks both.
    """

    kind: str = ""

    def __init__(self, settings: dict):
        self.settings = {**self.default_settings(), **(settings or {})}
        if self.settings.get("unlabeled") == "consistency" and type(self).consistency_term is Recipe.consistency_term:
            raise self._no_consistency()

    def _no_consistency(self) -> InputError:
        """The one-line refusal of ``unlabeled=consistency`` by a family without it."""
        return InputError(f"unlabeled=consistency: the {self.kind} model has no consistency training")

    @classmethod
    def default_settings(cls) -> dict:
        """Defaults for this family; overridden per recipe."""
        return {}

    @abc.abstractmethod
    def fit_config(self, cases: list[CaseData], num_classes: int) -> RecipeConfig:
        """Derive the JSON config (preprocessing, network shape) from the training cases."""

    @abc.abstractmethod
    def build_model(self, config: RecipeConfig) -> torch.nn.Module:
        """Return a fresh network for ``config``."""

    @abc.abstractmethod
    def preprocess(self, config: RecipeConfig, image, label=None) -> PreparedCase:
        """One scan (SimpleITK image, and optionally its label) as the network sees it."""

    @abc.abstractmethod
    def make_sampler(self, config: RecipeConfig, cases: list[CaseData], device, seed: int, rank: int = 0):
        """Return an object whose ``batch(step)`` gives ``(x, y)`` tensors on ``device``.

        ``x`` is float (B, 1, *patch), ``y`` is long (B, 1, *patch) with values 0..K.
        Memory must not grow with the augmentation level. ``rank`` (a training on several
        processes) keys the random draws with ``stream_seed(seed, rank)``, so every rank draws
        its own batches and rank 0 draws what one process draws.
        """

    def consistency_term(self, config: RecipeConfig, images: list, device, seed: int, rank: int = 0):
        """The weak-to-strong consistency term on unlabeled ``images`` (``unlabeled=consistency``):
        an object with ``views(teacher)`` and ``loss(out, target, mask)``; families without one refuse."""
        raise self._no_consistency()

    @abc.abstractmethod
    def loss_function(self, config: RecipeConfig) -> Callable:
        """Return ``loss(outputs, y)``; ``outputs`` is what the model returns in train mode."""

    def optimizer(self, model, config: RecipeConfig):
        """Return ``(optimizer, scheduler_or_None)``; the scheduler is stepped every iteration."""
        lr = float(config["settings"].get("learning_rate", 1e-3))
        return torch.optim.Adam(model.parameters(), lr=lr), None

    @abc.abstractmethod
    def predict_probabilities(self, model, config: RecipeConfig, image, device, tta: bool = False,
                              progress: ProgressCallback = None) -> np.ndarray:
        """Class probabilities (K+1, z, y, x) as float32 on ``image``'s own grid (array order)."""
