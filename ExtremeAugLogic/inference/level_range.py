"""Where the labelled structures lie in a new scan, from the delineated scans registered onto it.

A model trained on one scan can segment a structure beyond the labelled ones (the T12 vertebra
above L1, the sacrum below L5) and name it a level, which shifts the ordered labels and costs
binary Dice. The delineated scans know where their first and last structures lie; a rigid
registration (SimpleITK, Mattes mutual information, so it works across contrasts) of each onto
the new scan carries that knowledge over. ``LevelGuide.range_for`` gives the centroids of the
first and last structures along the order axis in the new scan's array (the median over the
delineated scans); ``structure_order.assign_structures`` drops objects that lie well beyond them.

Opt-in (``level_range=registration``): on 3 training scans x 14 it raised binary Dice (0.828 ->
0.839) but not per-structure Dice (0.745 -> 0.731), since the registration itself slips by one
vertebra on some pairs (docs/results/generalisation-explore, twelfth round).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ExtremeAugLogic.inference.structure_order import _positions_along
from ExtremeAugLogic.workspace import imageio

# Registration: shrink factors and smoothing (mm) per level, optimiser steps. One level
# at a quarter resolution: on vb01 x 14 as close to the labelled ends as two levels (4, 2), in 40 % of the time.
SHRINK_FACTORS = (4,)
SMOOTHING_MM = (2.0,)
OPTIMISER_STEPS = 100
# At most this many delineated scans serve as guides (each costs one registration per scan).
MAX_GUIDES = 3
# Self-training's level check: a pseudo-label's first and last structures must lie within this many
# pitches of where the guide puts them (set before any measurement: half the distance to the next level).
LEVEL_CHECK_PITCHES = 0.5


def rigid_transform(fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
    """The rigid transform mapping ``fixed``'s physical points to ``moving``'s (mutual information)."""
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    start = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                              sitk.CenteredTransformInitializerFilter.GEOMETRY)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(32)
    method.SetMetricSamplingStrategy(method.NONE)  # every voxel of the quarter-resolution scan: repeatable
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3,
                                                    numberOfIterations=OPTIMISER_STEPS, relaxationFactor=0.6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(SHRINK_FACTORS))
    method.SetSmoothingSigmasPerLevel(list(SMOOTHING_MM))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(start, inPlace=False)
    return method.Execute(fixed, moving)


def _wants_guide(config: dict) -> bool:
    """True when the model asks for a guide and its training labels showed an order of two or more."""
    return config["settings"].get("level_range", "off") == "registration" and has_level_chain(config)


class LevelGuide:
    """Delineated scans (image, label) that locate the first and last ordered structures in a new scan."""

    def __init__(self, atlases: list, order: dict):
        self.atlases = list(atlases)[:MAX_GUIDES]
        self.order = order

    def range_for(self, image: sitk.Image) -> tuple[float, float] | None:
        """Centroids of the first and last structures along the order axis, in ``image``'s array
        (median over the guides); None when no guide shows both after registration."""
        first_label, last_label = int(self.order["labels"][0]), int(self.order["labels"][-1])
        axis = int(self.order["axis"])
        firsts, lasts = [], []
        for atlas_image, atlas_label in self.atlases:
            try:
                transform = rigid_transform(image, atlas_image)
            except RuntimeError:  # ITK gave up (e.g. no overlap left): this guide says nothing
                continue
            warped = sitk.GetArrayFromImage(sitk.Resample(atlas_label, image, transform, sitk.sitkNearestNeighbor,
                                                          0, atlas_label.GetPixelID()))
            counts, centroid, _ = _positions_along(warped.astype(np.int64), axis)
            if max(first_label, last_label) < len(counts) and counts[first_label] and counts[last_label]:
                firsts.append(float(centroid[first_label]))
                lasts.append(float(centroid[last_label]))
        if not firsts:
            return None
        return float(np.median(firsts)), float(np.median(lasts))


def end_offsets(label_map: np.ndarray, expected: tuple[float, float], order: dict,
                pitch: float) -> list[float | None]:
    """How far (in pitches) ``label_map``'s first and last ordered structures lie from ``expected``
    (``LevelGuide.range_for``): [first, last]; None for an end the map lacks."""
    axis = int(order["axis"])
    counts, centroid, _ = _positions_along(label_map.astype(np.int64), axis)
    offsets = []
    for value, where in zip((int(order["labels"][0]), int(order["labels"][-1])), expected):
        present = value < len(counts) and counts[value] > 0
        offsets.append(round(abs(float(centroid[value]) - where) / pitch, 3) if present else None)
    return offsets


def level_verdict(label_map: np.ndarray, expected: tuple[float, float], order: dict, pitch: float,
                  tolerance: float = LEVEL_CHECK_PITCHES) -> dict:
    """Whether ``label_map`` names its levels where the guide expects them: {"offsets": the two
    ``end_offsets``, "joins": bool}.

    Each end (first and last ordered structure) must lie within ``tolerance`` pitches of its
    expected centroid; an end the map lacks passes only when its expected centroid lies outside
    the scan (the field of view stops before it), so a map with every level shifted by one, or a
    missing level that the scan shows, fails.
    """
    length = label_map.shape[int(order["axis"])]
    offsets = end_offsets(label_map, expected, order, pitch)
    joins = all(-0.5 > where or where > length - 0.5 if offset is None else offset <= tolerance
                for offset, where in zip(offsets, expected))
    return {"offsets": offsets, "joins": joins}


def has_level_chain(config: dict) -> bool:
    """True when the model's training labels showed an order of two or more structures."""
    order = config.get("structure_order")
    return bool(order) and len(order["labels"]) >= 2


def guide_from_cases(cases, config: dict) -> LevelGuide | None:
    """A guide from training cases (objects with ``image`` and ``label``) when the model asks for one.

    None unless the config's ``level_range`` setting is "registration" and the training labels
    showed an order with at least two structures.
    """
    if not _wants_guide(config):
        return None
    return LevelGuide([(case.image, case.label) for case in cases if case.label is not None], config["structure_order"])


def guide_for_version(workspace, version: str, config: dict) -> LevelGuide | None:
    """The guide of a workspace model version: its training scans, read from the workspace (None as
    ``guide_from_cases``)."""
    if not _wants_guide(config):
        return None
    atlases = []
    for case_id in workspace.version(version).get("cases_seen", [])[:MAX_GUIDES]:
        image_path, label_path = workspace.image_path(case_id), workspace.label_path(case_id)
        if image_path.is_file() and label_path.is_file():
            image = imageio.read_image(image_path)
            atlases.append((image, imageio.read_label(label_path, reference=image)))
    return LevelGuide(atlases, config["structure_order"]) if atlases else None
