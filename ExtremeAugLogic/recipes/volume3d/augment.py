"""On-the-fly 3D augmentation for the MSD model, batched on the training device.

Every sample is one ``grid_sample`` from the whole preprocessed volume held on the device:
the patch's voxel offsets (in mm) go through one affine matrix (rotation and isotropic
scaling), one smooth elastic displacement (a coarse grid of random vectors in mm,
up-sampled trilinearly, so the deformation is isotropic in mm whatever the spacing), and a
translation of the patch centre; the image is sampled trilinearly and the label by nearest
neighbour on that same grid, then Gaussian noise is added to the image. Sampling from the
whole volume means a rotated patch sees real anatomy; outside the volume (and where a patch
is larger than the scan) ``grid_sample``'s reflection padding mirrors image and label alike.

Level N (extreme augmentation): a fixed set of base patches (a grid with half-patch stride
over every case) each get N transforms; transform k of base patch p is drawn from a
generator seeded with (seed, p, k), so nothing is stored per transform and memory is the
same for any N. Two thirds of the draws come from base patches that contain foreground.
Level 0 draws a fresh transform every time and centres 2/3 of the patches on a random
foreground voxel (structure chosen uniformly among those present in the case).
Which base patch and transform sample b of batch ``step`` takes (and level 0's fresh
transforms) come from a generator seeded with (``stream_seed(seed, rank)``, step, b): on
several training processes every rank draws its own samples from the same level-N set.

For strongly anisotropic spacing (max/min > 3) rotations are in-plane only (about the
through-plane axis): rotating thick slices out of plane invents anatomy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ExtremeAugLogic.recipes.base import stream_seed

FG_COORDS_PER_CLASS = 4096       # foreground voxels remembered per structure and case


@dataclass(frozen=True)
class Ranges3D:
    """Augmentation ranges (configurable through the recipe settings)."""

    rotation_deg: float = 15.0
    scale_min: float = 0.85
    scale_max: float = 1.25
    translation_frac: float = 0.25   # of the patch extent, per axis
    elastic_mm: float = 3.0          # largest std of the coarse displacement vectors
    elastic_points: int = 4          # coarse grid points per axis
    noise_std: float = 0.1           # largest std of the Gaussian noise (z-scored intensities)
    fg_fraction: float = 2.0 / 3.0

    @classmethod
    def from_settings(cls, s: dict) -> "Ranges3D":
        scale = s.get("scale", (cls.scale_min, cls.scale_max))
        return cls(float(s.get("rotation_deg", cls.rotation_deg)), float(scale[0]), float(scale[1]),
                   float(s.get("translation_frac", cls.translation_frac)),
                   float(s.get("elastic_mm", cls.elastic_mm)),
                   int(s.get("elastic_points", cls.elastic_points)),
                   float(s.get("noise_std", cls.noise_std)),
                   float(s.get("fg_fraction", cls.fg_fraction)))


def rotation_matrix(angles) -> np.ndarray:
    """Rotation about axes 0, 1, 2 (array order) by ``angles`` radians, composed in that order."""
    out = np.eye(3)
    for axis, angle in enumerate(angles):
        a, b = [i for i in range(3) if i != axis]
        r = np.eye(3)
        c, s = math.cos(angle), math.sin(angle)
        r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
        out = r @ out
    return out


def sample_transform(rng: np.random.Generator, ranges: Ranges3D, patch, rotate_axes=(0, 1, 2)) -> dict:
    """Random parameters of one transform: angles (rad), scale, shift (voxels), elastic (mm), noise."""
    angles = np.zeros(3)
    limit = math.radians(ranges.rotation_deg)
    for axis in rotate_axes:
        angles[axis] = rng.uniform(-limit, limit)
    scale = rng.uniform(ranges.scale_min, ranges.scale_max)
    shift = rng.uniform(-1.0, 1.0, 3) * ranges.translation_frac * np.asarray(patch, dtype=float)
    g = ranges.elastic_points
    elastic = rng.normal(0.0, 1.0, (3, g, g, g)) * rng.uniform(0.0, ranges.elastic_mm)
    noise = rng.uniform(0.0, ranges.noise_std)
    return {"angles": angles, "scale": float(scale), "shift": shift, "elastic": elastic,
            "noise": float(noise), "noise_seed": int(rng.integers(0, 2 ** 62))}


def affine(params: dict) -> np.ndarray:
    """The 3x3 matrix taking patch offsets (mm) to volume offsets (mm): R @ (scale * I)."""
    return rotation_matrix(params["angles"]) * params["scale"]


def sampling_grid(params_list: list, centres, patch, spacing, shapes, device) -> torch.Tensor:
    """(B, *patch, 3) grid_sample coordinates (x, y, z order, align_corners=True), one per sample."""
    patch = [int(p) for p in patch]
    spacing_t = torch.tensor(spacing, dtype=torch.float32, device=device)
    axes = [(torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2.0) for n in patch]
    offsets = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1) * spacing_t  # mm
    mats = torch.tensor(np.stack([affine(p) for p in params_list]), dtype=torch.float32, device=device)
    coarse = torch.tensor(np.stack([p["elastic"] for p in params_list]), dtype=torch.float32, device=device)
    field = F.interpolate(coarse, size=patch, mode="trilinear", align_corners=True)  # (B, 3, *patch) mm
    mm = torch.einsum("zyxj,bij->bzyxi", offsets, mats) + field.permute(0, 2, 3, 4, 1)
    centre = torch.tensor(np.asarray(centres, dtype=np.float32), device=device)  # (B, 3) voxels
    voxels = mm / spacing_t + centre[:, None, None, None, :]
    size = torch.tensor(np.asarray(shapes, dtype=np.float32), device=device)
    denom = torch.clamp(size - 1.0, min=1.0)[:, None, None, None, :]
    normalised = 2.0 * voxels / denom - 1.0
    normalised = torch.where(size[:, None, None, None, :] > 1, normalised, torch.zeros_like(normalised))
    return normalised.flip(-1)


def warp(image: torch.Tensor, label: torch.Tensor, grid: torch.Tensor):
    """Sample one (1, 1, Z, Y, X) image (trilinear) and label (nearest) on one (1, *patch, 3) grid."""
    x = F.grid_sample(image, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    y = F.grid_sample(label, grid, mode="nearest", padding_mode="reflection", align_corners=True)
    return x, y


def grid_centres(shape, patch) -> np.ndarray:
    """Base patch centres (voxels) on a half-patch-stride grid covering a volume of ``shape``."""
    per_axis = []
    for n, p in zip(shape, patch):
        if n <= p:
            per_axis.append(np.array([(n - 1) / 2.0]))
        else:
            count = int(math.ceil((n - p) / (p / 2.0))) + 1
            per_axis.append(np.linspace((p - 1) / 2.0, n - 1 - (p - 1) / 2.0, count))
    mesh = np.meshgrid(*per_axis, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


class PatchSampler3D:
    """``batch(step) -> (x, y)``: augmented (B, 1, *patch) float image and long label patches.

    ``images``/``labels`` are per-case (Z, Y, X) float32 / integer numpy arrays on the training
    grid; they are moved to ``device`` once.
    """

    def __init__(self, images: list, labels: list, patch, spacing, batch_size: int, level: int,
                 ranges: Ranges3D, device, seed: int = 0, rank: int = 0):
        self.device = torch.device(device)
        self.patch = [int(p) for p in patch]
        self.spacing = [float(s) for s in spacing]
        self.batch_size = int(batch_size)
        self.level = int(level)
        self.ranges = ranges
        self.seed = int(seed)
        self.stream = stream_seed(self.seed, rank)  # keys the draws; the level-N transforms use ``seed``
        sp = np.asarray(self.spacing)
        anisotropic = sp.max() > 3.0 * sp.min()
        self.rotate_axes = (int(np.argmax(sp)),) if anisotropic else (0, 1, 2)
        self.shapes = [tuple(a.shape) for a in images]
        self.images = [torch.from_numpy(np.ascontiguousarray(a, np.float32))[None, None].to(self.device)
                       for a in images]
        self.labels = [torch.from_numpy(np.ascontiguousarray(a, np.float32))[None, None].to(self.device)
                       for a in labels]
        rng = np.random.default_rng(self.seed)
        self.fg_coords = [self._foreground_coords(np.asarray(a), rng) for a in labels]
        self.base = self._base_patches(labels)  # (P, 5): case, z, y, x, has-foreground

    # -- fixed, small state (independent of the level) -------------------------------------
    @staticmethod
    def _foreground_coords(label: np.ndarray, rng) -> list:
        coords = []
        for value in np.unique(label):
            if value == 0:
                continue
            where = np.argwhere(label == value)
            if len(where) > FG_COORDS_PER_CLASS:
                where = where[rng.choice(len(where), FG_COORDS_PER_CLASS, replace=False)]
            coords.append(where.astype(np.int32))
        return coords

    def _base_patches(self, labels: list) -> np.ndarray:
        rows = []
        for case, label in enumerate(labels):
            label = np.asarray(label)
            for c in grid_centres(label.shape, self.patch):
                lo = [max(0, int(round(ci - p / 2))) for ci, p in zip(c, self.patch)]
                hi = [int(round(ci + p / 2)) for ci, p in zip(c, self.patch)]
                has_fg = bool(label[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].any())
                rows.append([case, *c, float(has_fg)])
        return np.asarray(rows, dtype=np.float64)

    def state_bytes(self) -> int:
        """Bytes held by the sampler (volumes, foreground samples, base patches)."""
        tensors = sum(t.numel() * t.element_size() for t in self.images + self.labels)
        coords = sum(c.nbytes for cs in self.fg_coords for c in cs)
        return int(tensors + coords + self.base.nbytes)

    # -- drawing ----------------------------------------------------------------------------
    def draw(self, step: int, index: int):
        """(case, centre voxels, transform params) of sample ``index`` of batch ``step``."""
        rng = np.random.default_rng([self.stream, int(step), int(index)])
        if self.level <= 0:
            case = int(rng.integers(len(self.images)))
            coords = self.fg_coords[case]
            if coords and rng.random() < self.ranges.fg_fraction:
                cls = coords[int(rng.integers(len(coords)))]
                centre = cls[int(rng.integers(len(cls)))].astype(float)
            else:
                centre = rng.uniform(0, 1, 3) * (np.asarray(self.shapes[case]) - 1)
            params = sample_transform(rng, self.ranges, self.patch, self.rotate_axes)
            return case, centre, params
        has_fg = self.base[:, 4] > 0
        pool = np.arange(len(self.base))
        if has_fg.any() and (~has_fg).any():
            pool = pool[has_fg] if rng.random() < self.ranges.fg_fraction else pool[~has_fg]
        p = int(pool[int(rng.integers(len(pool)))])
        k = int(rng.integers(self.level))
        return self.fixed_transform(p, k)

    def fixed_transform(self, p: int, k: int):
        """Transform ``k`` of base patch ``p`` (deterministic in (seed, p, k))."""
        rng = np.random.default_rng([self.seed, 1_000_003, p, k])
        params = sample_transform(rng, self.ranges, self.patch, self.rotate_axes)
        row = self.base[p]
        return int(row[0]), row[1:4].copy(), params

    def sample(self, draws: list):
        """Warp the (case, centre, params) ``draws`` into an (x, y) batch."""
        centres = [c + p["shift"] for _, c, p in draws]
        shapes = [self.shapes[case] for case, _, _ in draws]
        grid = sampling_grid([p for _, _, p in draws], centres, self.patch, self.spacing, shapes,
                             self.device)
        xs, ys = [], []
        for b, (case, _, params) in enumerate(draws):
            x, y = warp(self.images[case], self.labels[case], grid[b:b + 1])
            if params["noise"] > 0:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(params["noise_seed"])
                x = x + params["noise"] * torch.randn(x.shape, generator=gen, device=self.device)
            xs.append(x)
            ys.append(y)
        return torch.cat(xs), torch.cat(ys).round().long()

    def batch(self, step: int):
        """The augmented batch of iteration ``step`` (deterministic in (seed, rank, step))."""
        return self.sample([self.draw(step, b) for b in range(self.batch_size)])
