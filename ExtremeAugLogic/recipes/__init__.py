"""Model families: ``base`` (the interface), ``slice2d`` (the paper's 2D model), ``volume3d``
(the MSD 3D model), ``windows`` (sliding-window prediction with flip TTA, shared), ``registry``."""

from ExtremeAugLogic.recipes.registry import MODEL_KINDS, make_recipe, model_kinds, register_recipe

__all__ = ["MODEL_KINDS", "make_recipe", "model_kinds", "register_recipe"]
