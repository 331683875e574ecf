"""The MSD 2018 auto-configured 3D residual encoder-decoder (Rippel et al.) as a ``Recipe``.

Preprocessing: every scan is resampled with SimpleITK to the median spacing of the training
cases (linear for images, nearest neighbour for labels) on a grid with the scan's own
direction and centre, then intensities are z-scored per scan after clipping to the 0.5-99.5
percentiles (MRI has no absolute scale; z-scores keep noise and augmentation ranges
comparable between scans). Prediction runs a Gaussian-blended sliding window at that
spacing (optionally with flip TTA), and the softmax probabilities are resampled linearly
back onto the scan's own grid (same size, spacing, origin, direction) and renormalised.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.losses import GeneralizedDiceLoss
from monai.transforms import ClipIntensityPercentiles, NormalizeIntensity, ScaleIntensityRangePercentiles

from ExtremeAugLogic.recipes.base import CaseData, PreparedCase, ProgressCallback, Recipe, RecipeConfig
from ExtremeAugLogic.recipes.volume3d import augment as augment3d, fingerprint as fingerprint3d
from ExtremeAugLogic.recipes.volume3d.network import build_resenc3d
from ExtremeAugLogic.recipes.windows import window_probabilities
from ExtremeAugLogic.workspace import imageio

DEFAULTS_3D = {
    "base_features": 6,
    "max_features": 320,
    "max_depth": 4,
    "batch_size": None,          # None: 4 on CUDA, 2 on CPU (a 2-core CPU step is already seconds)
    "learning_rate": 5e-4,
    "lr_decay": 0.984,           # multiplied every lr_decay_every iterations
    "lr_decay_every": 100,
    "level": 0,                  # transforms per base patch; 0 = fresh random every sample
    "deep_supervision": True,
    "dice_weights": "uniform",   # GDL class weights: uniform (1, the paper) | simple | square
    "memory_budget_mb": None,    # None: from the device (see fingerprint3d)
    "cpu_max_voxels": fingerprint3d.CPU_MAX_VOXELS,
    "patch_size": None,          # None: auto-configured; else [z, y, x] divisible by 2**d_i
    "intensity": "zscore",       # zscore (per scan, 0.5-99.5 % clipped) | percentile ([0, 1])
    "rotation_deg": 15.0,
    "scale": [0.85, 1.25],
    "translation_frac": 0.25,
    "elastic_mm": 3.0,
    "elastic_points": 4,
    "noise_std": 0.1,
    "fg_fraction": 2.0 / 3.0,
    "overlap": 0.5,
    "sw_batch_size": 1,
    "device": None,              # the training device, to size the patch; None: CUDA if present
}


class Recipe3D(Recipe):
    """Auto-configured 3D residual encoder-decoder with deep supervision (MSD 2018)."""

    kind = "3d"

    @classmethod
    def default_settings(cls) -> dict:
        return dict(DEFAULTS_3D)

    # -- configuration ---------------------------------------------------------------------
    def fit_config(self, cases: list[CaseData], num_classes: int) -> dict:
        """``num_classes`` counts the background (K + 1 output channels)."""
        shapes = [imageio.case_shape_zyx(c.image) for c in cases]
        spacings = [imageio.case_spacing_zyx(c.image) for c in cases]
        settings = {k: (str(v) if k == "device" and v is not None else v) for k, v in self.settings.items()}
        device = settings.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        config = fingerprint3d.configure(shapes, spacings, int(num_classes), settings,
                                         torch.device(device).type)
        config.update({
            "kind": self.kind, "settings": settings, "intensity": settings["intensity"],
            "deep_supervision": bool(settings["deep_supervision"]),
            "ds_weights": fingerprint3d.deep_supervision_weights(config["depth"],
                                                                 bool(settings["deep_supervision"])),
        })
        return RecipeConfig(config)

    def build_model(self, config: dict):
        return build_resenc3d(config)

    # -- preprocessing ---------------------------------------------------------------------
    def preprocess(self, config: dict, image, label=None) -> PreparedCase:
        """The scan (and label) resampled to the training spacing; geometry = that grid's reference image."""
        reference = target_grid(image, config["spacing"])
        resampled = resample_to(image, reference, sitk.sitkLinear)
        array = normalise(sitk.GetArrayFromImage(resampled).astype(np.float32), config["intensity"])
        labels = None
        if label is not None:
            labels = sitk.GetArrayFromImage(resample_to(label, reference, sitk.sitkNearestNeighbor))
            labels = labels.astype(np.uint8 if labels.max() < 256 else np.int32)
        return PreparedCase(array, labels, reference)

    def make_sampler(self, config: dict, cases: list[CaseData], device, seed: int, rank: int = 0):
        s = config["settings"]
        images, labels = [], []
        for case in cases:
            prepared = self.preprocess(config, case.image, case.label)
            images.append(prepared.image)
            labels.append(prepared.label)
        return augment3d.PatchSampler3D(images, labels, config["patch_size"], config["spacing"],
                                        config["batch_size"], int(s["level"]),
                                        augment3d.Ranges3D.from_settings(s), device, seed, rank=rank)

    # -- training --------------------------------------------------------------------------
    def loss_function(self, config: dict):
        return DeepSupervisedDice(config["ds_weights"], config["settings"].get("dice_weights", "uniform"))

    def optimizer(self, model, config: dict):
        """Adam 5e-4, decayed x0.984 every 100 steps (StepLR stepped every iteration)."""
        s = config["settings"]
        opt = torch.optim.Adam(model.parameters(), lr=float(s["learning_rate"]))
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=int(s["lr_decay_every"]),
                                                gamma=float(s["lr_decay"]))
        return opt, sched

    # -- prediction ------------------------------------------------------------------------
    @torch.no_grad()
    def predict_probabilities(self, model, config: dict, image, device, tta: bool = False,
                              progress: ProgressCallback = None) -> np.ndarray:
        s = config["settings"]
        prepared = self.preprocess(config, image)
        patch = [int(p) for p in config["patch_size"]]
        x = torch.from_numpy(prepared.image)[None, None].to(device)
        x, crop = pad_to_patch(x, patch)
        probs = window_probabilities(model, x, patch, device, overlap=float(s.get("overlap", 0.5)), tta=tta,
                                     sw_batch_size=int(s.get("sw_batch_size", 1)), progress=progress)[0]
        probs = probs[:, crop[0], crop[1], crop[2]].cpu().numpy()
        return to_original_grid(probs, prepared.geometry, image)


class DeepSupervisedDice:
    """Generalised Dice over the deep-supervision outputs, weights halving per level.

    MONAI's ``GeneralizedDiceLoss`` weighs class c by 1/volume (``w_type="simple"``) or
    1/volume**2 (``"square"``, the default); ``w_type="uniform"`` gives every class weight 1,
    the paper's choice (MONAI's ``w_func`` returns ``ones_like`` for it). Note that with weight 1
    and the background included, the denominator sums to twice the voxel count, so the loss is
    1 - the mean softmax probability of the true class. Targets are down-sampled by nearest
    neighbour to each output's size.
    """

    def __init__(self, weights, w_type: str = "uniform"):
        self.weights = [float(w) for w in weights]
        self.dice = GeneralizedDiceLoss(include_background=True, to_onehot_y=True, softmax=True,
                                        w_type=w_type)

    def __call__(self, outputs, y):
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
        outputs = outputs[:len(self.weights)]
        weights = self.weights[:len(outputs)]
        total = 0.0
        for w, out in zip(weights, outputs):
            target = y
            if tuple(out.shape[2:]) != tuple(y.shape[2:]):
                target = F.interpolate(y.float(), size=out.shape[2:], mode="nearest-exact").long()
            total = total + w * self.dice(out.float(), target)
        return total / sum(weights)


# -- grids ---------------------------------------------------------------------------------
def target_grid(image: sitk.Image, spacing_zyx) -> sitk.Image:
    """An empty image on the training grid: ``spacing_zyx``, the scan's direction, same centre."""
    new_spacing = np.asarray(list(reversed(spacing_zyx)), dtype=float)
    old_spacing = np.asarray(image.GetSpacing(), dtype=float)
    old_size = np.asarray(image.GetSize(), dtype=float)
    if np.allclose(new_spacing, old_spacing, rtol=1e-4, atol=0):
        new_spacing = old_spacing
    new_size = np.maximum(1, np.round(old_size * old_spacing / new_spacing)).astype(int)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    centre = np.asarray(image.GetOrigin()) + direction @ (old_spacing * (old_size - 1) / 2.0)
    origin = centre - direction @ (new_spacing * (new_size - 1) / 2.0)
    ref = sitk.Image([int(v) for v in new_size], sitk.sitkUInt8)
    ref.SetSpacing([float(v) for v in new_spacing])
    ref.SetOrigin([float(v) for v in origin])
    ref.SetDirection(image.GetDirection())
    return ref


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6, atol=1e-9)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-6)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-9))


def resample_to(image: sitk.Image, reference: sitk.Image, interpolator) -> sitk.Image:
    """``image`` on ``reference``'s grid (nearest-neighbour extrapolation at the rim)."""
    if same_grid(image, reference):
        return image
    f = sitk.ResampleImageFilter()
    f.SetReferenceImage(reference)
    f.SetInterpolator(interpolator)
    f.SetUseNearestNeighborExtrapolator(True)
    if interpolator != sitk.sitkNearestNeighbor:
        image = sitk.Cast(image, sitk.sitkVectorFloat32 if image.GetNumberOfComponentsPerPixel() > 1
                          else sitk.sitkFloat32)
    return f.Execute(image)


def to_original_grid(probs: np.ndarray, reference: sitk.Image, original: sitk.Image) -> np.ndarray:
    """(C, z, y, x) probabilities on ``reference``'s grid -> on ``original``'s grid, summing to 1."""
    if same_grid(reference, original):
        out = probs
    else:
        vec = sitk.GetImageFromArray(np.moveaxis(probs, 0, -1).astype(np.float32), isVector=True)
        vec.CopyInformation(reference)
        out = np.moveaxis(sitk.GetArrayFromImage(resample_to(vec, original, sitk.sitkLinear)), -1, 0)
    out = np.clip(out, 0.0, None)
    out = out / np.maximum(out.sum(axis=0, keepdims=True), 1e-8)
    return np.ascontiguousarray(out, dtype=np.float32)


# -- intensities and padding ---------------------------------------------------------------
def normalise(array: np.ndarray, mode: str) -> np.ndarray:
    """z-score after clipping to the 0.5-99.5 percentiles, or [0, 1] percentile scaling (MONAI transforms)."""
    if mode == "percentile":
        scale = ScaleIntensityRangePercentiles(0.5, 99.5, b_min=0.0, b_max=1.0, clip=True, dtype=np.float32)
        return np.asarray(scale(array), dtype=np.float32)
    if mode != "zscore":
        raise ValueError(f"intensity must be zscore or percentile, not {mode!r}")
    clipped = ClipIntensityPercentiles(lower=0.5, upper=99.5)(array)
    return np.asarray(NormalizeIntensity(dtype=np.float32)(clipped), dtype=np.float32)


def pad_to_patch(x: torch.Tensor, patch) -> tuple:
    """Reflect-pad (1, C, Z, Y, X) to at least ``patch``; return it and the crop back."""
    pads, crop = [], []
    for n, p in zip(x.shape[2:], patch):
        extra = max(0, int(p) - int(n))
        before = extra // 2
        pads.append((before, extra - before))
        crop.append(slice(before, before + int(n)))
    return reflect_pad(x, pads), tuple(crop)


def reflect_pad(x: torch.Tensor, pads) -> torch.Tensor:
    """Reflect padding of the 3 spatial axes, repeated while a pad exceeds the axis."""
    remaining = [list(p) for p in pads]
    while any(a or b for a, b in remaining):
        step = []
        for axis, (a, b) in enumerate(remaining):
            n = x.shape[2 + axis]
            step.append((min(a, n - 1), min(b, n - 1)))
        if all(s == (0, 0) for s in step):  # a single voxel cannot be reflected
            flat = [v for a, b in reversed(remaining) for v in (a, b)]
            return F.pad(x, flat, mode="replicate")
        flat = [v for a, b in reversed(step) for v in (a, b)]
        x = F.pad(x, flat, mode="reflect")
        remaining = [[a - sa, b - sb] for (a, b), (sa, sb) in zip(remaining, step)]
    return x
