"""The model families by name. The CLI's and the trainer's choices come from here; the
Slicer panel reads the same names from ``contract.MODEL_KINDS`` (a test keeps them equal)."""

from __future__ import annotations

import inspect

from ExtremeAugLogic.errors import InputError
from ExtremeAugLogic.recipes.base import Recipe
from ExtremeAugLogic.recipes.slice2d.recipe import Recipe2D
from ExtremeAugLogic.recipes.volume3d.recipe import Recipe3D

_RECIPES: dict[str, type] = {}


def register_recipe(cls: type) -> type:
    """Add a model family; refuses a class that is not a complete ``Recipe`` or reuses a kind."""
    if not (inspect.isclass(cls) and issubclass(cls, Recipe)):
        raise TypeError(f"{cls!r} is not a Recipe subclass")
    if not cls.kind or not isinstance(cls.kind, str):
        raise TypeError(f"{cls.__name__} has no kind")
    if inspect.isabstract(cls):
        raise TypeError(f"{cls.__name__} leaves {', '.join(sorted(cls.__abstractmethods__))} undefined")
    if cls.kind in _RECIPES and _RECIPES[cls.kind] is not cls:
        raise ValueError(f"model kind {cls.kind!r} is already taken by {_RECIPES[cls.kind].__name__}")
    _RECIPES[cls.kind] = cls
    return cls


def model_kinds() -> tuple:
    return tuple(_RECIPES)


def make_recipe(kind: str, settings: dict | None = None) -> Recipe:
    """A fresh ``Recipe`` of ``kind`` with ``settings`` over its defaults."""
    if kind not in _RECIPES:
        raise InputError(f"{kind}: model must be one of {', '.join(_RECIPES)}")
    return _RECIPES[kind](settings or {})


register_recipe(Recipe2D)
register_recipe(Recipe3D)
MODEL_KINDS = model_kinds()
