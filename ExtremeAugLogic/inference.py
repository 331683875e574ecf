"""Prediction: a model version applied to a scan, written as a label image on its exact grid.

Probabilities come from the recipe (sliding windows with Gaussian blending, optional flip
test-time augmentation); the label map is their argmax, cleaned of small disconnected specks
(the one-scan paper's false positives): for each structure, connected components smaller than
``min_component_fraction`` of its largest component are dropped (0 turns this off).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ExtremeAugLogic import atomic, imageio
from ExtremeAugLogic.errors import InputError

DEFAULT_MIN_COMPONENT_FRACTION = 0.1


def resolve_version(workspace, version: str | None) -> str:
    """``version`` itself, or the best version when None/"best", or the newest for "latest"."""
    if version in (None, "", "best"):
        best = workspace.best_version()
        if best is None:
            raise InputError(f"{workspace.path}: no trained model yet; run 'train' first")
        return best
    if version == "latest":
        done = [v["name"] for v in workspace.versions() if v.get("status") == "done"]
        if not done:
            raise InputError(f"{workspace.path}: no finished model version yet")
        return done[-1]
    workspace.version(version)  # raises InputError for an unknown name
    return version


def save_model(model_dir: Path, model, config: dict) -> None:
    """Write the weights (state dict only) and the recipe config, each atomically."""
    import torch

    atomic.write_json(model_dir / "config.json", config)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic.write_with(model_dir / "model.pt", lambda tmp: torch.save(state, tmp))


def load_model(workspace, version: str | None, device: str):
    """(recipe, config, model, version name) for a finished version, weights loaded safely."""
    import torch

    from ExtremeAugLogic.recipes import make_recipe

    name = resolve_version(workspace, version)
    folder = workspace.model_dir(name)
    weights = folder / "model.pt"
    if not weights.is_file():
        raise InputError(f"{weights}: model version {name} has no weights (did its training finish?)")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    recipe = make_recipe(config["kind"], config["settings"])
    model = recipe.build_model(config)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return recipe, config, model.to(device).eval(), name


def remove_specks(labels: np.ndarray, min_fraction: float) -> np.ndarray:
    """Drop, per structure, components smaller than ``min_fraction`` of its largest one."""
    if min_fraction <= 0:
        return labels
    out = labels.copy()
    for value in np.unique(labels[labels > 0]):
        components, count = ndimage.label(labels == value)
        if count < 2:
            continue
        sizes = np.bincount(components.ravel())[1:]
        small = np.flatnonzero(sizes < min_fraction * sizes.max()) + 1
        out[np.isin(components, small)] = 0
    return out


def predict_array(recipe, config: dict, model, image: sitk.Image, device: str, tta: bool = False,
                  min_component_fraction: float = DEFAULT_MIN_COMPONENT_FRACTION,
                  progress=None) -> np.ndarray:
    """Label array (numpy order, uint8) for ``image``."""
    probabilities = recipe.predict_probabilities(model, config, image, device, tta=tta, progress=progress)
    labels = np.argmax(probabilities, axis=0).astype(np.uint8)
    return remove_specks(labels, min_component_fraction)


def to_label_image(labels: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A label image with exactly ``reference``'s size, spacing, origin and direction."""
    label = sitk.GetImageFromArray(labels.astype(np.uint8))
    label.CopyInformation(reference)
    return label


def predict_file(workspace, image_path, output_path, version: str | None = None, device: str = "auto",
                 tta: bool = False, min_component_fraction: float = DEFAULT_MIN_COMPONENT_FRACTION,
                 progress=None) -> dict:
    """Predict ``image_path`` with a workspace model and write the label map to ``output_path``."""
    from ExtremeAugLogic.devices import resolve_device

    output_path = Path(output_path)
    if output_path.exists() and output_path.is_dir():
        raise InputError(f"{output_path}: output is a folder; give a file name such as pred.nii.gz")
    image = imageio.read_image(image_path)
    device = resolve_device(device)
    recipe, config, model, name = load_model(workspace, version, device)
    labels = predict_array(recipe, config, model, image, device, tta, min_component_fraction, progress)
    imageio.write_image(to_label_image(labels, image), output_path)
    names = workspace.structure_names()
    found = [names.get(int(v), f"structure_{v}") for v in np.unique(labels) if v > 0]
    return {"version": name, "output": str(output_path), "structures_found": found,
            "foreground_voxels": int((labels > 0).sum())}
