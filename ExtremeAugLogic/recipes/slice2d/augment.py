"""Extreme augmentation, batched on the training device at constant memory.

Level N means every base patch has N distinct random transforms; a transform is a rotation
uniform in +/-``rotation_deg``, a scale uniform in ``scale``, and x and y translations
uniform in +/-``translation_px`` (no flips). The parameters of transform k of patch p come
from a counter-based hash of (seed, p, k), so nothing is stored per transform and memory
does not grow with N; level 0 draws fresh parameters for every sample. Which patch and which
of its transforms a batch takes (and level 0's fresh draws) come from a generator seeded with
``stream_seed(seed, rank)``: on several training processes every rank draws its own batches
from the same level-N set.

Each patch is sampled straight from its whole preprocessed slice with one ``grid_sample``
(images bilinear, labels nearest), so a rotation or a 50 px shift brings in the real
neighbouring anatomy instead of padding a 128 px crop with zeros. Outside the slice the
padding mode (default: reflection) applies to image and label alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ExtremeAugLogic.errors import InputError
from ExtremeAugLogic.recipes.base import stream_seed
from ExtremeAugLogic.workspace import atomic

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class AugmentationRanges:
    """The paper's ranges (configurable)."""

    rotation_deg: float = 20.0
    scale_min: float = 0.8
    scale_max: float = 1.2
    translation_px: float = 50.0
    aspect: float = 1.0        # height / width stretch in [1/a, a] (not in the paper)
    elastic_px: float = 0.0    # smooth bending: displacements up to this many px (not in the paper)

    @classmethod
    def from_settings(cls, settings: dict) -> "AugmentationRanges":
        scale = settings.get("scale", (0.8, 1.2))
        aspect, elastic = float(settings.get("aspect", 1.0)), float(settings.get("elastic_px", 0.0))
        if aspect < 1.0 or elastic < 0.0:
            raise InputError(f"aspect must be >= 1 and elastic_px >= 0 (got {aspect:g} and {elastic:g})")
        return cls(float(settings.get("rotation_deg", 20.0)), float(scale[0]), float(scale[1]),
                   float(settings.get("translation_px", 50.0)), aspect, elastic)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixing function on int64 tensors (values stay below 2**32)."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def hashed_uniform(seed: int, patch_ids: torch.Tensor, k: torch.Tensor, channel: int) -> torch.Tensor:
    """Deterministic uniforms in [0, 1) for (seed, patch, k, channel), computed on their device."""
    x = _hash32(patch_ids.long() * 0x9E3779B1 + seed * 0x85EBCA77 + channel * 0xC2B2AE3D)
    x = _hash32(x ^ (k.long() * 0x27D4EB2F + 0x165667B1))
    return x.to(torch.float64).div(2.0 ** 32).to(torch.float32)


def transform_parameters(ranges: AugmentationRanges, count: int, device, seed: int = 0,
                         patch_ids: torch.Tensor | None = None, k: torch.Tensor | None = None,
                         generator: torch.Generator | None = None) -> dict:
    """Angles (rad), scales and translations (px) for ``count`` samples.

    With ``patch_ids`` and ``k`` the values are the fixed transforms of those (patch, k)
    pairs; without them they are fresh draws from ``generator``.
    """
    channels = 5 if ranges.aspect > 1.0 else 4  # without a stretch the draws stay those of the paper's four
    if patch_ids is None:
        u = torch.rand((channels, count), device=device, generator=generator)
    else:
        u = torch.stack([hashed_uniform(seed, patch_ids, k, c) for c in range(channels)])
    angle = (2 * u[0] - 1) * math.radians(ranges.rotation_deg)
    scale = ranges.scale_min + u[1] * (ranges.scale_max - ranges.scale_min)
    shift = (2 * u[2:4] - 1).T * ranges.translation_px  # (count, 2) as (row, col)
    params = {"angle": angle, "scale": scale, "shift": shift}
    if channels == 5:
        params["aspect"] = torch.exp((2 * u[4] - 1) * math.log(ranges.aspect))
    return params


def sampling_grid(centres_rc: torch.Tensor, params: dict, patch: int, size: int) -> torch.Tensor:
    """``grid_sample`` grids (B, patch, patch, 2) for patches of the transformed slices.

    The transformed slice is ``I'(x) = I(T^-1 x)`` with ``T`` a rotation and scale about the
    patch centre followed by the shift; the patch shows ``I'`` around the centre, so a
    positive shift moves the anatomy towards larger row/col in the patch.
    """
    device = centres_rc.device
    offsets = torch.arange(patch, device=device, dtype=torch.float32) - (patch - 1) / 2.0
    rows, cols = torch.meshgrid(offsets, offsets, indexing="ij")
    rel = torch.stack([rows, cols], dim=-1).reshape(1, -1, 2) - params["shift"][:, None, :]
    cos, sin = torch.cos(params["angle"]), torch.sin(params["angle"])
    inv = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
    inv = inv / params["scale"][:, None, None]
    if "aspect" in params:  # rows stretched by a, columns by 1/a, after the rotation
        a = params["aspect"]
        inv = inv * torch.stack([1.0 / a, a], -1)[:, None, :]
    src = torch.einsum("bij,bnj->bni", inv, rel) + (centres_rc.float() - 0.5)[:, None, :]
    norm = (2.0 * src + 1.0) / size - 1.0  # align_corners=False convention
    return norm.flip(-1).reshape(-1, patch, patch, 2)  # grid_sample wants (x=col, y=row)


def bend_grid(grid: torch.Tensor, max_px: float, size: int, generator: torch.Generator | None = None,
              knots: int = 4) -> torch.Tensor:
    """Add a smooth random displacement of up to ``max_px`` slice pixels to ``grid_sample`` grids.

    Each sample gets a ``knots`` x ``knots`` grid of uniform displacements, upsampled bilinearly
    over the patch, so the anatomy bends as a whole (a spine with more or less lordosis, a
    wedge-shaped body) while neighbouring pixels move together; image and label share the grid.
    A fresh bend for every sample (drawn from ``generator``), outside the level-N fixed
    transforms: the offline N-fold dataset has none.
    """
    b, h, w, _ = grid.shape
    coarse = (torch.rand((b, 2, knots, knots), device=grid.device, generator=generator) * 2 - 1) * max_px
    field = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)
    return grid + field.permute(0, 2, 3, 1) * (2.0 / size)


def image_padding_mode(padding: str) -> str:
    """``grid_sample``'s padding mode for images under ``padding`` (see ``sample_patches``)."""
    return "reflection" if padding == "reflection-background" else padding


def sample_patches(images: torch.Tensor, labels: torch.Tensor | None, slice_ids: torch.Tensor,
                   grid: torch.Tensor, padding: str = "reflection"):
    """Sample image (bilinear) and label (nearest) patches from (S, 1, H, W) slice stacks.

    ``padding`` (outside the slice): "zeros" or "reflection" for image and label alike, or
    "reflection-background": the image mirrored, the label background there, so the model meets
    structure-like anatomy beyond the labelled ones (a whole vertebra above L1) that is not to
    be segmented.
    """
    image_padding = image_padding_mode(padding)
    label_padding = "zeros" if padding == "reflection-background" else padding
    x = F.grid_sample(images[slice_ids], grid, mode="bilinear", padding_mode=image_padding,
                      align_corners=False)
    if labels is None:
        return x, None
    y = F.grid_sample(labels[slice_ids].float(), grid, mode="nearest", padding_mode=label_padding,
                      align_corners=False)
    return x, y.round().long()


@dataclass
class IntensityRanges:
    """Ranges of the per-sample intensity changes (1.0 or 0.0 turns each off).

    gamma in [1/g, g], contrast in [1/c, c] about the patch mean, brightness shift in
    [-b, b], a smooth multiplicative bias field exp(f) with |f| <= ``bias_field`` (a random
    3x3 grid upsampled bilinearly, so it stays within its range: one slow shading across the patch), and Gaussian noise
    with a standard deviation drawn in [0, ``noise_std``]. Not in the paper: a model trained
    on one scan meets other contrasts before it meets other poses.
    """

    gamma: float = 1.0
    contrast: float = 1.0
    brightness: float = 0.0
    bias_field: float = 0.0
    noise_std: float = 0.0
    remap: float = 0.0
    random_conv: float = 0.0

    @classmethod
    def from_settings(cls, s: dict) -> "IntensityRanges":
        return cls(float(s.get("gamma", 1.0)), float(s.get("contrast", 1.0)), float(s.get("brightness", 0.0)),
                   float(s.get("bias_field", 0.0)), float(s.get("noise_std", 0.0)),
                   float(s.get("remap", 0.0)), float(s.get("random_conv", 0.0)))

    @property
    def active(self) -> bool:
        return self.gamma > 1.0 or self.contrast > 1.0 or self.brightness > 0 or self.bias_field > 0 \
            or self.noise_std > 0 or self.remap > 0 or self.random_conv > 0


def augment_intensity(x: torch.Tensor, ranges: IntensityRanges,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply the random intensity changes of ``ranges`` to a batch (B, C, H, W), on its device."""
    if not ranges.active:
        return x
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)

    def uniform(low, high):
        return low + (high - low) * torch.rand(shape, device=x.device, generator=generator)

    if ranges.remap > 0:
        x = remap_intensity(x, ranges.remap, generator)
    if ranges.random_conv > 0:
        x = random_convolution(x, ranges.random_conv, generator)
    if ranges.gamma > 1.0:
        x = x.clamp(min=0) ** torch.exp(uniform(-1, 1) * np.log(ranges.gamma))
    if ranges.contrast > 1.0:
        mean = x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
        x = (x - mean) * torch.exp(uniform(-1, 1) * np.log(ranges.contrast)) + mean
    if ranges.brightness > 0:
        x = x + uniform(-ranges.brightness, ranges.brightness)
    if ranges.bias_field > 0:
        coarse = (torch.rand((x.shape[0], 1, 3, 3), device=x.device, generator=generator) * 2 - 1) * ranges.bias_field
        x = x * torch.exp(F.interpolate(coarse, size=x.shape[-2:], mode="bilinear", align_corners=True))
    if ranges.noise_std > 0:
        noise = torch.randn(x.shape, device=x.device, generator=generator)
        x = x + noise * uniform(0, ranges.noise_std)
    return x


REMAP_KNOTS = 6


def remap_intensity(x: torch.Tensor, probability: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """With ``probability`` per sample, pass intensities through a random increasing curve.

    The curve is piecewise linear through ``REMAP_KNOTS`` evenly spaced inputs over the sample's
    own range, their outputs sorted uniform draws: one tissue may turn brighter than its
    neighbour's old value, as fat or fluid do between scans, while the order of intensities is kept.
    """
    b = x.shape[0]
    flat = x.reshape(b, -1)
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    t = (flat - low) / (high - low).clamp(min=1e-6) * (REMAP_KNOTS - 1)
    inner = torch.rand((b, REMAP_KNOTS - 2), device=x.device, generator=generator).sort(dim=1).values
    knots = torch.cat([torch.zeros((b, 1), device=x.device), inner, torch.ones((b, 1), device=x.device)], dim=1)
    index = t.floor().clamp(0, REMAP_KNOTS - 2).long()
    frac = t - index
    below, above = knots.gather(1, index), knots.gather(1, index + 1)
    curved = (below + frac * (above - below)) * (high - low) + low
    apply = torch.rand((b, 1), device=x.device, generator=generator) < probability
    return torch.where(apply, curved, flat).reshape(x.shape)


def random_convolution(x: torch.Tensor, probability: float, generator: torch.Generator | None = None,
                       width: int = 4, layers: int = 3) -> torch.Tensor:
    """With ``probability`` per sample, blend it with the output of a random shallow network.

    Global intensity non-linear augmentation (Ouyang et al., single-source domain generalisation):
    each sample gets its own random 3x3-then-1x1 convolutions with leaky ReLUs (one grouped
    convolution for the batch), rescaled to the sample's mean and standard deviation and mixed
    with the sample by a random weight. Shapes survive, textures and contrasts change.
    """
    b, c, h, w = x.shape
    device = x.device
    # every channel (a 2.5D input's neighbouring slices) goes through its sample's network
    y = x.reshape(1, b * c, h, w)
    channels = 1
    for layer in range(layers):
        out = 1 if layer == layers - 1 else width
        k = 3 if layer == 0 else 1
        weight = torch.randn((b, out, channels, k, k), device=device, generator=generator) / np.sqrt(channels * k * k)
        weight = weight.repeat_interleave(c, dim=0).reshape(b * c * out, channels, k, k)
        y = F.conv2d(y, weight, padding=k // 2, groups=b * c)
        if layer < layers - 1:
            y = F.leaky_relu(y, 0.2)
        channels = out
    y = y.reshape(b, c, h, w)
    dims = tuple(range(1, x.dim()))
    y = (y - y.mean(dims, keepdim=True)) / y.std(dims, keepdim=True).clamp(min=1e-6)
    y = y * x.std(dims, keepdim=True) + x.mean(dims, keepdim=True)
    alpha = torch.rand((b, 1, 1, 1), device=device, generator=generator)
    apply = (torch.rand((b, 1, 1, 1), device=device, generator=generator) < probability).float()
    return x + apply * alpha * (y - x)


def vary_structure_intensity(x: torch.Tensor, y: torch.Tensor, spread: float,
                             generator: torch.Generator | None = None, blur_px: int = 2) -> torch.Tensor:
    """Scale the intensities inside the labelled structures by one random factor per sample.

    The factor is log-uniform in [1/``spread``, ``spread``] and fades to 1 across the structures'
    outline (a box blur of ``blur_px`` pixels of the foreground mask), so no new edge appears.
    The marrow of a vertebral body, and with it its contrast to its surroundings, differs from
    scan to scan (its fat fraction rises with age); one delineated scan shows a single value.
    """
    if spread <= 1.0:
        return x
    soft = F.avg_pool2d((y > 0).float(), 2 * blur_px + 1, stride=1, padding=blur_px, count_include_pad=False)
    log_factor = (torch.rand((x.shape[0], 1, 1, 1), device=x.device, generator=generator) * 2 - 1) * math.log(spread)
    return x * torch.exp(log_factor * soft)


def cut_field_of_view(x: torch.Tensor, y: torch.Tensor | None, probability: float, max_fraction: float,
                      generator: torch.Generator | None = None, edges: tuple[int, ...] = (0, 1, 2, 3)):
    """With ``probability`` per sample, end the field of view early at one random edge.

    ``edges`` are the candidates: 0 top rows, 1 bottom rows, 2 left columns, 3 right columns.
    A band of up to ``max_fraction`` of the patch along one of them becomes 0 in the
    image and background in the label, as if the scan had been acquired with a smaller field of
    view there. A structure cut by the band keeps its label on the visible side, so the model
    cannot name a structure by counting from the edge of the image (the first whole vertebra
    below the top edge is L1 in one scan, T12 in the next) and must use the anatomy itself.
    """
    b, _, h, w = x.shape
    device = x.device
    apply = torch.rand(b, device=device, generator=generator) < probability
    choices = torch.as_tensor(edges, device=device)
    edge = choices[torch.randint(len(choices), (b,), device=device, generator=generator)]
    depth = torch.rand(b, device=device, generator=generator) * max_fraction
    rows = torch.arange(h, device=device, dtype=torch.float32)[None, :, None] / h
    cols = torch.arange(w, device=device, dtype=torch.float32)[None, None, :] / w
    d = depth[:, None, None]
    e = edge[:, None, None]
    cut = (((e == 0) & (rows < d)) | ((e == 1) & (rows >= 1 - d))
           | ((e == 2) & (cols < d)) | ((e == 3) & (cols >= 1 - d))) & apply[:, None, None]
    cut = cut[:, None]
    x = x.masked_fill(cut, 0.0)
    if y is not None:
        y = y.masked_fill(cut, 0)
    return x, y


class OnTheFlySampler:
    """Random batches from base patches x N transforms, generated on the device each step."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, centres: np.ndarray,
                 level: int, ranges: AugmentationRanges, patch: int = 128, batch_size: int = 16,
                 seed: int = 0, padding: str = "reflection", gamma: float = 1.0, contrast: float = 1.0,
                 intensity: IntensityRanges | None = None, rank: int = 0,
                 fov_cut: float = 0.0, fov_cut_max: float = 0.4, fov_cut_edges: tuple[int, ...] = (0, 1, 2, 3),
                 structure_intensity: float = 1.0):
        self.images, self.labels = images, labels
        self.structure_intensity = float(structure_intensity)
        self.fov_cut, self.fov_cut_max, self.fov_cut_edges = float(fov_cut), float(fov_cut_max), tuple(fov_cut_edges)
        self.centres = torch.as_tensor(centres, dtype=torch.long, device=images.device)
        self.level, self.ranges, self.patch = int(level), ranges, patch
        self.batch_size, self.seed, self.padding = batch_size, seed, padding
        self.intensity = intensity or IntensityRanges(gamma=gamma, contrast=contrast)
        self.generator = torch.Generator(device=images.device)
        self.generator.manual_seed(stream_seed(seed, rank))  # the draws; the level-N transforms use ``seed``

    @property
    def distinct_samples(self) -> int | None:
        """Base patches x level (None for level 0: every sample is new)."""
        return len(self.centres) * self.level if self.level > 0 else None

    def batch(self, step: int):
        """Return ``(x, y)``: (B, 1, patch, patch) float images and long labels."""
        device = self.images.device
        pick = torch.randint(len(self.centres), (self.batch_size,), device=device, generator=self.generator)
        if self.level > 0:
            k = torch.randint(self.level, (self.batch_size,), device=device, generator=self.generator)
            params = transform_parameters(self.ranges, self.batch_size, device, self.seed, pick, k)
        else:
            params = transform_parameters(self.ranges, self.batch_size, device, generator=self.generator)
        centres = self.centres[pick]
        grid = sampling_grid(centres[:, 1:], params, self.patch, self.images.shape[-1])
        if self.ranges.elastic_px > 0:
            grid = bend_grid(grid, self.ranges.elastic_px, self.images.shape[-1], self.generator)
        x, y = sample_patches(self.images, self.labels, centres[:, 0], grid, self.padding)
        x = vary_structure_intensity(x, y, self.structure_intensity, self.generator)
        x = augment_intensity(x, self.intensity, self.generator)
        if self.fov_cut > 0:
            x, y = cut_field_of_view(x, y, self.fov_cut, self.fov_cut_max, self.generator, self.fov_cut_edges)
        return x, y


def write_offline_dataset(images: torch.Tensor, labels: torch.Tensor, centres: np.ndarray,
                          level: int, ranges: AugmentationRanges, folder, patch: int = 128,
                          seed: int = 0, chunk: int = 256, padding: str = "reflection",
                          progress=None) -> dict:
    """Write the paper's N-fold dataset to ``folder`` as .npy files, streamed chunk by chunk.

    Sample ``p * level + k`` is transform k of base patch p, the same transform the on-the-fly
    sampler uses. Images are float16, labels uint8; at most ``chunk`` patches are in memory.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    total = len(centres) * level
    device = images.device
    all_centres = torch.as_tensor(centres, dtype=torch.long, device=device)
    with atomic.atomic_path(folder / "images.npy", ".npy") as img_tmp, \
            atomic.atomic_path(folder / "labels.npy", ".npy") as lab_tmp:
        out_x = np.lib.format.open_memmap(img_tmp, mode="w+", dtype=np.float16, shape=(total, patch, patch))
        out_y = np.lib.format.open_memmap(lab_tmp, mode="w+", dtype=np.uint8, shape=(total, patch, patch))
        for start in range(0, total, chunk):
            ids = torch.arange(start, min(start + chunk, total), device=device)
            pick, k = ids // level, ids % level
            params = transform_parameters(ranges, len(ids), device, seed, pick, k)
            grid = sampling_grid(all_centres[pick][:, 1:], params, patch, images.shape[-1])
            x, y = sample_patches(images, labels, all_centres[pick][:, 0], grid, padding)
            out_x[start:start + len(ids)] = x[:, 0].cpu().numpy().astype(np.float16)
            out_y[start:start + len(ids)] = y[:, 0].cpu().numpy().astype(np.uint8)
            if progress:
                progress(start + len(ids), total)
        out_x.flush(), out_y.flush()
        del out_x, out_y
    return {"samples": total, "folder": str(folder)}


class OfflineSampler:
    """Random batches read from an offline N-fold dataset (memory-mapped, never all in RAM)."""

    def __init__(self, folder, batch_size: int = 16, seed: int = 0, device="cpu", rank: int = 0):
        self.x = np.load(Path(folder) / "images.npy", mmap_mode="r")
        self.y = np.load(Path(folder) / "labels.npy", mmap_mode="r")
        self.batch_size, self.device = batch_size, device
        self.rng = np.random.default_rng(stream_seed(seed, rank))

    def batch(self, step: int):
        ids = np.sort(self.rng.integers(0, len(self.x), self.batch_size))
        x = torch.from_numpy(self.x[ids].astype(np.float32))[:, None].to(self.device)
        y = torch.from_numpy(self.y[ids].astype(np.int64))[:, None].to(self.device)
        return x, y
