"""Prediction: a model version applied to a scan, written as a label image on its exact grid.

Probabilities come from the recipe (sliding windows with Gaussian blending, optional flip
test-time augmentation, ``recipes.windows``); the label map is their argmax, cleaned of small
disconnected specks (the one-scan paper's false positives): for each structure, connected
components smaller than ``min_component_fraction`` of its largest component are dropped
(0 turns this off).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ExtremeAugLogic import contract
from ExtremeAugLogic.devices import resolve_device
from ExtremeAugLogic.errors import InputError
from ExtremeAugLogic.inference.level_range import guide_for_version
from ExtremeAugLogic.inference.postprocess import DEFAULT_MIN_COMPONENT_FRACTION, remove_specks
from ExtremeAugLogic.inference.structure_order import assign_structures
from ExtremeAugLogic.recipes.base import RecipeConfig
from ExtremeAugLogic.recipes.registry import make_recipe
from ExtremeAugLogic.workspace.imageio import case_spacing_zyx
from ExtremeAugLogic.workspace import atomic, imageio
from ExtremeAugLogic.manifest_check import check_version_config


def save_model(model_dir: Path, model, config: dict) -> None:
    """Write the weights (state dict only) and the recipe config, each atomically."""
    atomic.write_json(model_dir / contract.CONFIG_NAME, config)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic.write_with(model_dir / contract.MODEL_WEIGHTS_NAME, lambda tmp: torch.save(state, tmp))


def read_config(model_dir: Path, allowed_dirs=()) -> RecipeConfig:
    """A version's ``config.json`` as a ``RecipeConfig``, checked: only the fields the engine
    writes, and no path outside the workspace unless it is in ``allowed_dirs`` (given by the user)."""
    path = Path(model_dir) / contract.CONFIG_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: missing; the model version is incomplete") from None
    except ValueError as exc:
        raise InputError(f"{path}: damaged ({exc})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: damaged (not a JSON object)")
    return RecipeConfig(check_version_config(raw, path, allowed_dirs))


def load_weights(path: Path, device="cpu") -> dict:
    """A state dict from ``path``, tensors only (``weights_only=True``): a pickled payload never runs."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # an UnpicklingError names the refused global
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: refused to load: not plain weights ({first})") from None


def load_model(workspace, version: str | None, device: str):
    """(recipe, config, model, version name) for a finished version, weights loaded safely."""
    name = workspace.resolve_version(version)
    folder = workspace.model_dir(name)
    workspace.version_record_file(name)  # version.json must agree with the manifest
    weights = folder / contract.MODEL_WEIGHTS_NAME
    if not weights.is_file():
        raise InputError(f"{weights}: model version {name} has no weights (did its training finish?)")
    config = read_config(folder)
    recipe = make_recipe(config.kind, config.settings)
    model = recipe.build_model(config)
    model.load_state_dict(load_weights(weights))
    return recipe, config, model.to(device).eval(), name


OBJECT_RULES = ("off", "per-object", "ordered", "ordered-aligned", "ordered-split")


def labels_from_probabilities(probabilities: np.ndarray, config: dict, objects: str | None = None,
                              min_component_fraction: float = DEFAULT_MIN_COMPONENT_FRACTION,
                              spacing=None, level_range=None, chain: str | None = None) -> np.ndarray:
    """The label map (uint8) from class probabilities (K+1, z, y, x).

    ``objects`` (default: the model's ``objects`` setting, else "off"): "off" is the voxel-wise
    argmax; "per-object" gives each connected 3D object one structure label; "ordered" also
    keeps the structures in the anatomical order the training labels showed (the config's
    ``structure_order``; per object alone when the labels showed none), its chain one object per
    level (parts side by side are one level; with more levels than labels, those cut by the scan's
    edge go first, and those beyond the chain's ends become background); "ordered-aligned"
    chooses the chain among all large objects instead (opt-in: not better across training scans,
    docs/results/generalisation-explore; ``chain`` of
    ``structure_order.assign_structures``); "ordered-split" is "ordered" after cutting every
    object as long as several structures into as many (the order's ``pitch_mm`` over the voxel
    size ``spacing``, in array-axis order, of the scan; without both it is "ordered").
    ``level_range`` (ordered rules only; ``level_range.LevelGuide.range_for``): objects lying well
    beyond the expected first and last structures are background. ``chain`` overrides the ordered
    rules' chain (``structure_order.CHAINS``). Specks are removed last.
    """
    objects = objects or config["settings"].get("objects", "off")
    if objects not in OBJECT_RULES:
        raise InputError(f"objects {objects!r}: must be one of {', '.join(OBJECT_RULES)}")
    if objects == "off":
        labels = np.argmax(probabilities, axis=0).astype(np.uint8)
    else:
        order = config.get("structure_order") if objects.startswith("ordered") else None
        chain = chain or ("aligned" if objects == "ordered-aligned" else "largest")
        pitch = None
        if objects == "ordered-split" and order and order.get("pitch_mm") and spacing is not None:
            pitch = float(order["pitch_mm"]) / float(spacing[int(order["axis"])])
        labels = assign_structures(probabilities, order, chain=chain, pitch=pitch,
                                   level_range=level_range if order else None)
    return remove_specks(labels, min_component_fraction)


def pseudo_labels_from_probabilities(probabilities: np.ndarray, config: dict, spacing) -> np.ndarray:
    """Self-training's label map of a worklist scan, by the model's ``pseudo_label_rule`` setting.

    "as-predicted" (the recipe's default) labels it as a prediction is labelled. "ordered-largest"
    is the rule self-training was first measured with: the ordered rule with the chain of the
    largest parts; a model config without the setting (made before it existed) keeps it.
    """
    if config["settings"].get("pseudo_label_rule", "ordered-largest") == "as-predicted":
        return labels_from_probabilities(probabilities, config, spacing=spacing)
    return labels_from_probabilities(probabilities, config, "ordered", chain="largest-parts")


def predict_array(recipe, config: dict, model, image: sitk.Image, device: str, tta: bool = False,
                  min_component_fraction: float = DEFAULT_MIN_COMPONENT_FRACTION,
                  progress=None, objects: str | None = None, level_guide=None) -> np.ndarray:
    """Label array (numpy order, uint8) for ``image``; ``level_guide``: a ``level_range.LevelGuide`` or None."""
    probabilities = recipe.predict_probabilities(model, config, image, device, tta=tta, progress=progress)
    return labels_from_probabilities(probabilities, config, objects, min_component_fraction,
                                     case_spacing_zyx(image), level_guide.range_for(image) if level_guide else None)


def to_label_image(labels: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A label image with exactly ``reference``'s size, spacing, origin and direction."""
    label = sitk.GetImageFromArray(labels.astype(np.uint8))
    label.CopyInformation(reference)
    return label


def predict_file(workspace, image_path, output_path, version: str | None = None, device: str = "auto",
                 tta: bool = False, min_component_fraction: float = DEFAULT_MIN_COMPONENT_FRACTION,
                 progress=None, objects: str | None = None) -> dict:
    """Predict ``image_path`` with a workspace model and write the label map to ``output_path``."""
    output_path = Path(output_path)
    if output_path.exists() and output_path.is_dir():
        raise InputError(f"{output_path}: output is a folder; give a file name such as pred.nii.gz")
    image = imageio.read_image(image_path)
    device = resolve_device(device)
    recipe, config, model, name = load_model(workspace, version, device)
    labels = predict_array(recipe, config, model, image, device, tta, min_component_fraction, progress, objects,
                           guide_for_version(workspace, name, config))
    imageio.write_image(to_label_image(labels, image), output_path)
    names = workspace.structure_names()
    found = [names.get(int(v), f"structure_{v}") for v in np.unique(labels) if v > 0]
    return {"version": name, "output": str(output_path), "structures_found": found,
            "foreground_voxels": int((labels > 0).sum())}
