"""Pick a model family by name ("2d", the paper's model, or "3d", the MSD model)."""

from __future__ import annotations

from ExtremeAugLogic.errors import InputError

MODEL_KINDS = ("2d", "3d")


def make_recipe(kind: str, settings: dict | None = None):
    """A fresh ``Recipe`` of ``kind`` with ``settings`` over its defaults."""
    if kind == "2d":
        from ExtremeAugLogic.recipe2d import Recipe2D

        return Recipe2D(settings or {})
    if kind == "3d":
        from ExtremeAugLogic.recipe3d import Recipe3D

        return Recipe3D(settings or {})
    raise InputError(f"{kind}: model must be one of {', '.join(MODEL_KINDS)}")
