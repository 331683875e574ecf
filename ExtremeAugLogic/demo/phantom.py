"""Procedural 3D lumbar spine MRI phantom with labels.

The built-in data of the demo and the tests. Each seed gives a different subject: a
sagittal-style lumbar spine scan (T11..S3 with discs, spinal canal with CSF and cord,
posterior elements, paraspinal muscles, subcutaneous fat, abdomen with bowel, aorta)
with MRI-like texture, a smooth multiplicative bias field and Rician noise, and a label
map of either the vertebral bodies L1..L5, the discs L1-L2..L5-S1, or both.

Array layout (``SimpleITK.GetArrayFromImage``), like the shared spine-vb scans:
axis 0 = superior -> inferior, axis 1 = anterior -> posterior, axis 2 = left-right, so a
sagittal slice is ``array[:, :, i]``. ``shape`` and ``spacing`` are given in this numpy
order (SI, AP, LR); the SimpleITK image gets them reversed (x = LR, y = AP, z = SI).
The anatomy is built in array space; ``direction`` and ``origin`` only set the header.

Labels (see :func:`phantom_names`):

- ``"vertebrae"``: 1..5 = L1..L5 bodies.
- ``"discs"``: 1..5 = L5-S1, L4-L5, L3-L4, L2-L3, L1-L2 (inferior first, the order of the
  shared spine-ivd scans).
- ``"both"``: 1..5 = L1..L5 bodies, 6..10 = the discs in the ``"discs"`` order (+5).

T11, T12, the T11-T12 and T12-L1 discs and the sacrum are never labelled (distractors).
The anatomy is scaled so that L1..L5 fill about three quarters of the superior-inferior
field of view, as in a lumbar scan framed on L1..L5.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ExtremeAugLogic.errors import InputError
from ExtremeAugLogic.workspace.imageio import write_image

STRUCTURES = ("vertebrae", "discs", "both")
DEFAULT_SHAPE = (96, 96, 32)
DEFAULT_SPACING = (2.0, 2.0, 2.5)  # mm, numpy order (SI, AP, LR): thicker sagittal slices
DEFAULT_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # as the shared scans
MIN_SIZE = 16

LUMBAR = ("L1", "L2", "L3", "L4", "L5")
DISCS_INFERIOR_FIRST = ("L5-S1", "L4-L5", "L3-L4", "L2-L3", "L1-L2")

# Tissue classes of the internal tissue map.
AIR, SOFT, FAT, MUSCLE, MARROW, POSTERIOR_BONE, NUCLEUS, ANNULUS, CSF, CORD, \
    VESSEL, BOWEL_BRIGHT, BOWEL_DARK, SKIN, LIGAMENT, DARK_DISC = range(16)
N_TISSUES = 16

# Mean intensity per tissue (water-weighted / T2-like, the range of the uint8 spine-vb scans).
BASE_INTENSITY = {
    AIR: 4.0, SOFT: 58.0, FAT: 160.0, MUSCLE: 45.0, MARROW: 110.0, POSTERIOR_BONE: 100.0,
    NUCLEUS: 165.0, ANNULUS: 118.0, CSF: 185.0, CORD: 75.0, VESSEL: 25.0,
    BOWEL_BRIGHT: 95.0, BOWEL_DARK: 15.0, SKIN: 90.0, LIGAMENT: 38.0, DARK_DISC: 75.0,
}
# A T1-weighted-like contrast (``contrast="t1"``): fatty marrow bright, CSF and discs dark; the
# other tissues keep their T2-like means. Scans of another sequence than the delineated one.
T1_INTENSITY = {**BASE_INTENSITY, CSF: 40.0, NUCLEUS: 70.0, ANNULUS: 60.0, MARROW: 150.0,
                POSTERIOR_BONE: 140.0, CORD: 90.0}
CONTRASTS = {"t2": BASE_INTENSITY, "t1": T1_INTENSITY}
CORTEX_FACTOR = 0.45  # cortical bone rim: this fraction of the marrow intensity
BONE = (MARROW, POSTERIOR_BONE)

# Nominal anatomy in mm: level -> (body height, AP radius, LR radius).
NOMINAL_BODIES = {
    "T11": (25.0, 16.5, 21.5), "T12": (27.0, 17.5, 23.0),
    "L1": (28.5, 18.5, 24.0), "L2": (29.5, 19.0, 25.0), "L3": (30.0, 19.5, 26.5),
    "L4": (30.0, 20.0, 27.5), "L5": (29.0, 20.5, 28.5),
    "S1": (26.0, 21.0, 30.0), "S2": (20.0, 16.5, 24.0), "S3": (16.0, 12.5, 18.0),
}
# Disc height (mm) at the centre below each level; sacral "discs" are fused remnants.
NOMINAL_DISC_BELOW = {"T11": 5.5, "T12": 6.5, "L1": 7.5, "L2": 8.0, "L3": 8.5, "L4": 9.0,
                      "L5": 6.0, "S1": 2.5, "S2": 2.0}
NOMINAL_COLUMN = (sum(NOMINAL_BODIES[n][0] for n in ("L1", "L2", "L3", "L4", "L5"))
                  + sum(NOMINAL_DISC_BELOW[n] for n in ("L1", "L2", "L3", "L4")))  # L1 top..L5 bottom
COLUMN_FRACTION = 0.76  # of the SI field of view


# ---------------------------------------------------------------- public API

def phantom_names(structures: str = "vertebrae") -> dict[int, str]:
    """Label value -> structure name for a phantom made with ``structures``."""
    _check_structures(structures)
    vertebrae = {i + 1: name for i, name in enumerate(LUMBAR)}
    discs = {i + 1: name for i, name in enumerate(DISCS_INFERIOR_FIRST)}
    if structures == "vertebrae":
        return vertebrae
    if structures == "discs":
        return discs
    return {**vertebrae, **{value + 5: name for value, name in discs.items()}}


def make_phantom(seed: int, shape: Sequence[int] = DEFAULT_SHAPE,
                 spacing: Sequence[float] = DEFAULT_SPACING, structures: str = "vertebrae",
                 direction: Optional[Sequence[float]] = None,
                 origin: Optional[Sequence[float]] = None,
                 contrast: str = "t2") -> tuple[sitk.Image, sitk.Image]:
    """Make one phantom: ``(image float32, label uint8)`` on the same grid.

    ``shape`` and ``spacing`` are in numpy order (SI, AP, LR). ``direction`` is the
    SimpleITK 3x3 direction (row-major, 9 values; default diag(1, 1, -1) like the shared
    scans); ``origin`` is in SimpleITK (x, y, z) order, default: the centre of the image
    at physical (0, 0, 0). ``contrast`` is ``"t2"`` (water bright, the default) or ``"t1"``
    (marrow bright, CSF and discs dark); a seed gives the same anatomy in both. The same
    arguments always give the same phantom.
    """
    shape, spacing = _check_grid(shape, spacing)
    _check_structures(structures)
    if contrast not in CONTRASTS:
        raise InputError(f"contrast: must be one of {', '.join(CONTRASTS)}, not {contrast!r}")
    direction, origin = _check_geometry(direction, origin)
    rng = np.random.default_rng(seed)
    subject = _random_subject(rng, shape, spacing, CONTRASTS[contrast])
    canvas = _Canvas(shape, spacing, subject.rotation, subject.shift)
    tissue, label = _paint_anatomy(canvas, subject, structures, rng)
    image = _render(tissue, canvas, subject, rng)
    return _to_sitk(image, label, spacing, direction, origin)


def write_phantom_set(folder: str | os.PathLike, n: int, seed0: int = 0,
                      **kwargs) -> list[tuple[Path, Path]]:
    """Write ``n`` phantoms (seeds ``seed0 .. seed0+n-1``) as ``phantomNN_image/label.nii.gz``.

    Extra keyword arguments go to :func:`make_phantom`. Files are written atomically.
    Returns the ``(image_path, label_path)`` pairs in order.
    """
    folder = Path(folder)
    pairs = []
    for i in range(int(n)):
        image, label = make_phantom(seed0 + i, **kwargs)
        image_path = folder / f"phantom{i + 1:02d}_image.nii.gz"
        label_path = folder / f"phantom{i + 1:02d}_label.nii.gz"
        write_image(image, image_path)
        write_image(label, label_path)
        pairs.append((image_path, label_path))
    return pairs


# ---------------------------------------------------------------- input checks

def _check_structures(structures: str) -> None:
    if structures not in STRUCTURES:
        raise InputError(f"structures: must be one of {', '.join(STRUCTURES)}, not {structures!r}")


def _check_grid(shape, spacing) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """Validate ``shape`` (3 ints >= MIN_SIZE) and ``spacing`` (3 positive mm)."""
    try:
        shape = tuple(int(s) for s in shape)
        spacing = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise InputError(f"shape/spacing: need three numbers each, got {shape!r}, {spacing!r}") from None
    if len(shape) != 3 or min(shape) < MIN_SIZE:
        raise InputError(f"shape: need three sizes of at least {MIN_SIZE} voxels, got {shape}")
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"spacing: need three positive spacings in mm, got {spacing}")
    return shape, spacing


# ---------------------------------------------------------------- subject parameters

@dataclass
class _Body:
    """One vertebral body (or sacral segment) in anatomy coordinates (mm)."""

    name: str
    center: np.ndarray  # (u, v): u = SI (inferior +), v = AP (posterior +); w = 0
    angle: float  # tilt of the body axis from SI towards posterior (radians)
    half_height: float
    ap: float  # AP radius
    lr: float  # LR radius


@dataclass
class _Disc:
    """The disc (or fused remnant) between two bodies."""

    name: str
    upper: _Body
    lower: _Body


@dataclass
class _Subject:
    """Everything random about one phantom except the noise fields."""

    scale: float
    bodies: list
    discs: list
    centerline: tuple  # (u_apex, v_apex, k): v = v_apex + k (u - u_apex)^2
    rotation: np.ndarray  # anatomy -> grid
    shift: np.ndarray  # mm, grid frame
    skin_depth: float  # skin behind the spinal centreline (mm)
    fat_thickness: float
    canal: tuple  # (AP radius, LR radius)
    intensity: dict
    noise: float  # Rician sigma as a fraction of marrow intensity
    dark_discs: set  # names of degenerated (dark) discs


def _random_subject(rng: np.random.Generator, shape, spacing, base_intensity: dict) -> _Subject:
    """Draw pose, size, curvature and contrast of one subject."""
    fov = np.array(shape) * np.array(spacing)
    scale = COLUMN_FRACTION * fov[0] / NOMINAL_COLUMN * rng.uniform(0.92, 1.06)
    width = rng.uniform(0.88, 1.12)
    sizes = {name: (h * scale * rng.uniform(0.93, 1.07),
                    ap * scale * width * rng.uniform(0.96, 1.04),
                    lr * scale * width * rng.uniform(0.96, 1.04))
             for name, (h, ap, lr) in NOMINAL_BODIES.items()}
    u_top = -fov[0] / 2 + fov[0] * rng.uniform(0.08, 0.14)
    u_apex = u_top + 0.8 * NOMINAL_COLUMN * scale
    v_apex = fov[1] * rng.uniform(-0.08, 0.0)
    reach = 100.0 * scale
    k = 13.0 * scale * rng.uniform(0.5, 1.5) / reach ** 2  # L1 ~13 mm behind the apex
    centerline = (u_apex, v_apex, k)
    sacral = math.radians(rng.uniform(20.0, 34.0))
    bodies, discs = _build_column(sizes, centerline, u_top, sacral, scale)
    _fit_column(bodies, fov[0])
    return _Subject(
        scale=scale, bodies=bodies, discs=discs, centerline=centerline,
        rotation=_rotation(rng), shift=rng.uniform([-6, -6, -3], [6, 6, 3]) * scale,
        skin_depth=100.0 * scale * rng.uniform(0.88, 1.1),
        fat_thickness=scale * rng.uniform(6.0, 20.0),
        canal=(7.5 * scale * rng.uniform(0.85, 1.15), 11.0 * scale * rng.uniform(0.9, 1.1)),
        intensity={t: v * rng.uniform(0.85, 1.15) for t, v in base_intensity.items()},
        noise=rng.uniform(0.02, 0.06),
        dark_discs={name for name in ("L3-L4", "L4-L5", "L5-S1") if rng.random() < 0.2},
    )


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """Small random rotation: sagittal tilt +-6 deg, coronal +-3 deg, axial +-3 deg."""
    a, b, c = np.radians(rng.uniform([-6, -3, -3], [6, 3, 3]))
    sagittal = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    coronal = np.array([[math.cos(b), 0, -math.sin(b)], [0, 1, 0], [math.sin(b), 0, math.cos(b)]])
    axial = np.array([[1, 0, 0], [0, math.cos(c), -math.sin(c)], [0, math.sin(c), math.cos(c)]])
    return sagittal @ coronal @ axial


def _slope_angle(centerline, u: float) -> float:
    """Angle of the lordotic centreline at ``u`` (positive = going posterior downwards)."""
    u_apex, _, k = centerline
    return math.atan(2.0 * k * (u - u_apex))


def _direction(angle: float) -> np.ndarray:
    return np.array([math.cos(angle), math.sin(angle)])


def _build_column(sizes, centerline, u_top, sacral, scale) -> tuple[list, list]:
    """Stack the bodies along the lordotic centreline, L1 top at ``u_top``; add discs."""
    u_apex, v_apex, k = centerline
    # L5 is wedge-shaped, the sacrum tilts back by `sacral` and curves further.
    extra = {"L5": 0.35 * sacral, "S1": sacral, "S2": sacral + math.radians(12),
             "S3": sacral + math.radians(24)}
    top = np.array([u_top, v_apex + k * (u_top - u_apex) ** 2])
    bodies = []
    previous = None
    for name in ("L1", "L2", "L3", "L4", "L5", "S1", "S2", "S3"):
        h, ap, lr = sizes[name]
        angle = _slope_angle(centerline, top[0] + h / 2) + extra.get(name, 0.0)
        if previous is not None:
            top = _next_top(previous, angle, ap, NOMINAL_DISC_BELOW[previous.name] * scale)
        body = _Body(name, top + _direction(angle) * h / 2, angle, h / 2, ap, lr)
        bodies.append(body)
        previous = body
    # Thoracic bodies above L1, walking upwards.
    below = bodies[0]
    for name in ("T12", "T11"):
        h, ap, lr = sizes[name]
        top_of_below = below.center - _direction(below.angle) * below.half_height
        gap = NOMINAL_DISC_BELOW[name] * scale
        angle = _slope_angle(centerline, top_of_below[0] - gap - h / 2)
        mid = _direction((angle + below.angle) / 2)
        center = top_of_below - mid * gap - _direction(angle) * h / 2
        body = _Body(name, center, angle, h / 2, ap, lr)
        bodies.insert(0, body)
        below = body
    discs = [_Disc(f"{a.name}-{b.name}", a, b) for a, b in zip(bodies[:-1], bodies[1:])]
    return bodies, discs


def _next_top(upper: _Body, angle: float, ap: float, gap: float) -> np.ndarray:
    """Top-endplate centre of the next body: a wedge gap, the nominal height posteriorly."""
    bottom = upper.center + _direction(upper.angle) * upper.half_height
    turn = max(angle - upper.angle, 0.0)
    gap_center = gap + 0.5 * (upper.ap + ap) * math.sin(turn)
    return bottom + _direction((angle + upper.angle) / 2) * gap_center


def _fit_column(bodies: list, fov_si: float) -> None:
    """Shift the column up if L5 would leave the field of view (large size draws)."""
    l5 = next(b for b in bodies if b.name == "L5")
    bottom = l5.center[0] + l5.half_height
    limit = fov_si / 2 - 0.04 * fov_si
    if bottom > limit:
        for body in bodies:
            body.center = body.center - np.array([bottom - limit, 0.0])


# ---------------------------------------------------------------- coordinates

class _Canvas:
    """Anatomy coordinates (mm) of every voxel, with cheap SI sub-ranges per object."""

    def __init__(self, shape, spacing, rotation: np.ndarray, shift: np.ndarray):
        self.shape = shape
        self.spacing = np.array(spacing)
        self.rotation = rotation
        self.shift = shift
        axes = [((np.arange(n) - (n - 1) / 2) * s).astype(np.float32) for n, s in zip(shape, spacing)]
        grid = np.meshgrid(*axes, indexing="ij", sparse=True)
        # anatomy = R^T (grid - shift)
        rows = rotation.T
        self.u, self.v, self.w = (
            sum(np.float32(rows[i, j]) * (grid[j] - np.float32(shift[j])) for j in range(3))
            .astype(np.float32) for i in range(3))

    def box(self, center_uv, radius: float) -> Optional[tuple[slice, slice]]:
        """Axis-0/1 slices holding the sphere around anatomy point ``(u, v, 0)``, or None."""
        point = self.rotation @ np.array([center_uv[0], center_uv[1], 0.0]) + self.shift
        box = []
        for axis in (0, 1):
            middle = point[axis] / self.spacing[axis] + (self.shape[axis] - 1) / 2
            reach = radius / self.spacing[axis] + 1
            start = max(int(math.floor(middle - reach)), 0)
            stop = min(int(math.ceil(middle + reach)) + 1, self.shape[axis])
            if start >= stop:
                return None
            box.append(slice(start, stop))
        return tuple(box)

    def coords(self, box: tuple[slice, slice]):
        return self.u[box], self.v[box], self.w[box]


def _across(body: "_Body", t: float) -> np.ndarray:
    """Anatomy (u, v) of the point ``t`` mm behind the body centre, across its axis."""
    return body.center + t * np.array([-math.sin(body.angle), math.cos(body.angle)])


def _local(u, v, center, angle: float):
    """(s, t): along the body axis (inferior +) and across it (posterior +)."""
    du, dv = u - np.float32(center[0]), v - np.float32(center[1])
    c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    return du * c + dv * s, dv * c - du * s


def _rounded_box(x, y, z, hx, hy, hz):
    """Superellipsoid 'rounded box' mask (power 4) with half sizes (hx, hy, hz)."""
    total = None
    for coord, half in ((x, hx), (y, hy), (z, hz)):
        q = coord * np.float32(1.0 / half)
        q = q * q
        total = q * q if total is None else total + q * q
    return total <= 1.0


# ---------------------------------------------------------------- painting

def _paint_anatomy(canvas: _Canvas, subject: _Subject, structures: str,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Tissue map and label map (both uint8, numpy order)."""
    tissue = np.empty(canvas.shape, np.uint8)
    label = np.zeros(canvas.shape, np.uint8)
    _paint_background(tissue, canvas, subject, rng)
    for body in subject.bodies:
        if body.name[0] != "S":
            _paint_posterior_elements(tissue, canvas, subject, body)
    _paint_canal(tissue, canvas, subject)
    body_values, disc_values = _label_values(structures)
    for body in subject.bodies:
        _paint_body(tissue, label, canvas, body, body_values.get(body.name, 0))
    for disc in subject.discs:
        _paint_disc(tissue, label, canvas, subject, disc, disc_values.get(disc.name, 0))
    return tissue, label


def _label_values(structures: str) -> tuple[dict, dict]:
    """Label value per body name and per disc name for ``structures``."""
    names = phantom_names(structures)
    bodies = {n: v for v, n in names.items() if n in LUMBAR}
    discs = {n: v for v, n in names.items() if n in DISCS_INFERIOR_FIRST}
    return bodies, discs


def _paint_background(tissue, canvas: _Canvas, subject: _Subject, rng) -> None:
    """Abdomen with bowel, prevertebral tissue, vessels, muscles, fat, skin and air."""
    u, v, w = canvas.u, canvas.v, canvas.w
    u_apex, v_apex, k = subject.centerline
    t = v - np.float32(v_apex) - np.float32(k) * (u - np.float32(u_apex)) ** 2  # AP from spine
    s = subject.scale
    ap = np.mean([b.ap for b in subject.bodies if b.name in LUMBAR])
    bowel = _smooth_field(rng, canvas.shape, sigma_mm=9.0 * s, spacing=canvas.spacing)
    tissue[...] = SOFT
    tissue[bowel > 0.9] = BOWEL_BRIGHT
    tissue[bowel < -1.2] = BOWEL_DARK
    tissue[(t > -ap - 14 * s) & (t < 0)] = SOFT  # prevertebral tissue
    psoas = ((t + 2 * s) / (13 * s)) ** 2 + ((np.abs(w) - 40 * s) / (14 * s)) ** 2 <= 1.0
    tissue[psoas & (u > u_apex - 90 * s)] = MUSCLE
    aorta = ((t + ap + 11 * s) / (9 * s)) ** 2 + ((w - 12 * s) / (9 * s)) ** 2 <= 1.0
    tissue[aorta & (u < u_apex)] = VESSEL
    ivc = ((t + ap + 9 * s) / (7 * s)) ** 2 + ((w + 14 * s) / (10 * s)) ** 2 <= 1.0
    tissue[ivc & (u < u_apex)] = SOFT
    wobble = np.float32(3 * s) * np.sin(u / np.float32(37 * s))
    skin = t - wobble
    tissue[(skin > 0) & (skin <= subject.skin_depth)] = MUSCLE
    tissue[(skin > subject.skin_depth - subject.fat_thickness) & (skin <= subject.skin_depth)] = FAT
    tissue[(skin > subject.skin_depth) & (skin <= subject.skin_depth + 2.5 * s)] = SKIN
    tissue[skin > subject.skin_depth + 2.5 * s] = AIR


def _smooth_field(rng, shape, sigma_mm: float, spacing) -> np.ndarray:
    """Gaussian random field with unit standard deviation and correlation ``sigma_mm``."""
    field = rng.standard_normal(shape).astype(np.float32)
    sigma = [max(sigma_mm / sp, 0.3) for sp in spacing]
    field = ndimage.gaussian_filter(field, sigma, mode="wrap", truncate=3.0)
    return field / max(float(field.std()), 1e-6)


def _paint_posterior_elements(tissue, canvas: _Canvas, subject: _Subject, body: _Body) -> None:
    """Pedicles, articular pillars, lamina and spinous process behind one body."""
    s = subject.scale
    canal_ap, canal_lr = subject.canal
    front = 0.85 * body.ap + 1.5 * s
    back = front + 2 * canal_ap
    hh = body.half_height
    near, far = 0.5 * front, back + 40 * s
    box = canvas.box(_across(body, (near + far) / 2), math.hypot((far - near) / 2 + 3 * s, 1.7 * hh))
    if box is None:
        return
    u, v, w = canvas.coords(box)
    sl, tl = _local(u, v, body.center, body.angle)
    aw = np.abs(w)
    region = tissue[box]
    bone = _rounded_box(sl + 0.25 * hh, tl - (front + back) / 2 + 2 * s, aw - canal_lr - 4 * s,
                        0.4 * hh, (back - front) / 2 + 0.7 * body.ap / 2, 4.5 * s)  # pedicles
    bone |= _rounded_box(sl - 0.15 * hh, tl - back, aw - canal_lr - 5 * s,
                         1.05 * hh, canal_ap, 5.5 * s)  # articular pillars
    bone |= _rounded_box(sl - 0.1 * hh, tl - back - 3.5 * s, w, 0.6 * hh, 4.5 * s,
                         canal_lr + 8 * s)  # lamina
    reach = tl - back
    spinous = _rounded_box(sl - 0.2 * hh - 0.12 * np.maximum(reach, 0), reach - 19 * s, w,
                           0.55 * hh, 18 * s, 5.0 * s)
    bone |= spinous
    region[bone] = POSTERIOR_BONE
    ligament = _rounded_box(sl - 1.05 * hh, reach - 16 * s, w, 0.3 * hh, 15 * s, 2.5 * s)
    region[ligament & (region != POSTERIOR_BONE)] = LIGAMENT


def _paint_canal(tissue, canvas: _Canvas, subject: _Subject) -> None:
    """CSF-filled canal behind every body (sacral canal narrower), cord down to L1."""
    canal_ap, canal_lr = subject.canal
    s = subject.scale
    for body in subject.bodies:
        sacral = body.name[0] == "S"
        factor = 0.55 if sacral else 1.0
        front = 0.85 * body.ap + 1.5 * s
        extent = body.half_height + NOMINAL_DISC_BELOW.get(body.name, 3.0) * s + 3 * s
        box = canvas.box(_across(body, front + canal_ap), math.hypot(extent, canal_ap) + 1)
        if box is None:
            continue
        u, v, w = canvas.coords(box)
        sl, tl = _local(u, v, body.center, body.angle)
        cross = ((tl - front - canal_ap * factor) / (canal_ap * factor)) ** 2 + (w / (canal_lr * factor)) ** 2
        region = tissue[box]
        region[(cross <= 1.0) & (np.abs(sl) <= extent)] = CSF
        if body.name in ("T11", "T12", "L1"):
            taper = np.clip((sl + body.half_height) / (2 * body.half_height), 0, 1) if body.name == "L1" else 0.0
            radius = 0.45 * (1.0 - 0.8 * taper)
            cord = ((tl - front - canal_ap * 0.9) / (canal_ap * radius)) ** 2 + (w / (canal_lr * radius)) ** 2
            region[(cord <= 1.0) & (np.abs(sl) <= extent) & ((sl <= body.half_height) | (body.name != "L1"))] = CORD


def _body_mask(u, v, w, body: _Body) -> np.ndarray:
    """Rounded, slightly waisted cylinder with a flatter posterior wall."""
    sl, tl = _local(u, v, body.center, body.angle)
    z = sl * np.float32(1.0 / body.half_height)
    z2 = z * z
    waist = np.float32(1.0) - np.float32(0.07) * (np.float32(1.0) - np.minimum(z2, np.float32(1.0)))
    ta = tl * np.where(tl > 0, np.float32(1.0 / (0.85 * body.ap)), np.float32(1.0 / body.ap))
    wl = w * np.float32(1.0 / body.lr)
    rho2 = (ta * ta + wl * wl) / (waist * waist)
    return z2 * z2 * z2 + rho2 * rho2 * rho2 <= 1.0


def _paint_body(tissue, label, canvas: _Canvas, body: _Body, value: int) -> None:
    box = canvas.box(body.center, radius=math.hypot(body.half_height, max(body.ap, body.lr)))
    if box is None:
        return
    mask = _body_mask(*canvas.coords(box), body)
    tissue[box][mask] = MARROW
    if value:
        label[box][mask] = value


def _paint_disc(tissue, label, canvas: _Canvas, subject: _Subject, disc: _Disc, value: int) -> None:
    """Fill between the two endplates inside an elliptic cross-section; nucleus inside."""
    up, low = disc.upper, disc.lower
    center = (up.center + low.center) / 2
    radius = math.hypot(up.half_height + low.half_height, max(up.ap, up.lr, low.ap, low.lr))
    box = canvas.box(center, radius)
    if box is None:
        return
    u, v, w = canvas.coords(box)
    s_up, _ = _local(u, v, up.center, up.angle)
    s_low, _ = _local(u, v, low.center, low.angle)
    angle = (up.angle + low.angle) / 2
    mid = (up.center + _direction(up.angle) * up.half_height
           + low.center - _direction(low.angle) * low.half_height) / 2
    sm, tm = _local(u, v, mid, angle)
    ap = np.float32(0.5 * (up.ap + low.ap) * 1.02)
    lr = np.float32(0.5 * (up.lr + low.lr) * 1.02)
    ta = tm * np.where(tm > 0, np.float32(1.0 / (0.85 * ap)), np.float32(1.0 / ap))
    wl = w * np.float32(1.0 / lr)
    rho2 = ta * ta + wl * wl
    between = (s_up > up.half_height * 0.8) & (s_low < -low.half_height * 0.8)
    mask = between & (rho2 <= 1.0) & ~_body_mask(u, v, w, up) & ~_body_mask(u, v, w, low)
    mask = _largest_component(mask)  # drop slivers beside rounded body corners
    region = tissue[box]
    if up.name[0] == "S":
        region[mask] = ANNULUS  # fused sacral remnant
    elif disc.name in subject.dark_discs:
        region[mask] = DARK_DISC  # degenerated: dehydrated, no bright nucleus
    else:
        region[mask] = ANNULUS
        gap = max(float(np.abs(sm[mask]).max()) if mask.any() else 1.0, 1.0)
        core = sm * np.float32(1.0 / (0.8 * gap))
        region[mask & ((rho2 * np.float32(1 / 0.6) + core * core) <= 1.0)] = NUCLEUS
    if value:
        label[box][mask] = value


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected component of ``mask`` (``mask`` itself if it has <= 1)."""
    components, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


# ---------------------------------------------------------------- rendering

def _render(tissue: np.ndarray, canvas: _Canvas, subject: _Subject, rng) -> np.ndarray:
    """Intensities from the tissue map: texture, cortical rim, blur, bias field, noise."""
    table = np.array([subject.intensity[t] for t in range(N_TISSUES)], np.float32)
    image = table[tissue]
    fine = _smooth_field(rng, canvas.shape, sigma_mm=1.2 * subject.scale, spacing=canvas.spacing)
    coarse = _smooth_field(rng, canvas.shape, sigma_mm=6.0 * subject.scale, spacing=canvas.spacing)
    amplitude = np.full(N_TISSUES, 0.06, np.float32)
    amplitude[[MARROW, POSTERIOR_BONE]] = 0.12
    amplitude[[SOFT, BOWEL_BRIGHT, FAT, MUSCLE]] = 0.10
    amplitude[AIR] = 0.0
    image *= 1.0 + amplitude[tissue] * (0.6 * fine + 0.8 * coarse)
    bone = np.isin(tissue, BONE)
    cortex = bone & ~ndimage.binary_erosion(bone)
    image[cortex] = subject.intensity[MARROW] * CORTEX_FACTOR
    image = ndimage.gaussian_filter(image, [0.45 * min(canvas.spacing) / sp for sp in canvas.spacing])
    image *= _bias_field(rng, canvas)
    sigma = subject.noise * subject.intensity[MARROW]
    real = image + rng.normal(0.0, sigma, image.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, image.shape).astype(np.float32)
    gain = np.float32(rng.uniform(0.7, 1.4))
    return (np.sqrt(real * real + imag * imag) * gain).astype(np.float32)


def _bias_field(rng, canvas: _Canvas) -> np.ndarray:
    """Smooth multiplicative field: brighter towards the posterior (spine coil), +-20 %."""
    axes = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in canvas.shape],
                       indexing="ij", sparse=True)
    z, y, x = axes
    c = rng.normal(0.0, 1.0, 6).astype(np.float32)
    log_bias = (0.08 * c[0] * z + (0.10 + 0.04 * c[1]) * y + 0.05 * c[2] * x
                + 0.06 * c[3] * z * z + 0.05 * c[4] * y * y + 0.04 * c[5] * z * y)
    return np.exp(log_bias).astype(np.float32)


# ---------------------------------------------------------------- SimpleITK

def _check_geometry(direction, origin) -> tuple[tuple, Optional[tuple]]:
    """Validate ``direction`` (9 values, orthonormal) and ``origin`` (3 values)."""
    values = DEFAULT_DIRECTION if direction is None else direction
    try:
        values = tuple(float(d) for d in values)
        point = None if origin is None else tuple(float(o) for o in origin)
    except (TypeError, ValueError):
        raise InputError(f"direction/origin: need numbers, got {direction!r}, {origin!r}") from None
    matrix = np.array(values).reshape(3, 3) if len(values) == 9 else None
    if matrix is None or not np.allclose(matrix @ matrix.T, np.eye(3), atol=1e-4):
        raise InputError(f"direction: need the 9 values of an orthonormal 3x3 matrix, got {values}")
    if point is not None and (len(point) != 3 or not all(map(math.isfinite, point))):
        raise InputError(f"origin: need 3 finite values (x, y, z), got {point}")
    return values, point


def _to_sitk(image: np.ndarray, label: np.ndarray, spacing, direction, origin):
    """Wrap the arrays with spacing (reversed to x, y, z), direction and origin."""
    spacing_xyz = tuple(float(s) for s in reversed(spacing))
    if origin is None:  # the image centre at physical (0, 0, 0)
        half = (np.array(image.shape[::-1]) - 1) * np.array(spacing_xyz) / 2
        origin = tuple(float(o) for o in -(np.array(direction).reshape(3, 3) @ half))
    out = []
    for array in (image, label):
        item = sitk.GetImageFromArray(array)
        item.SetSpacing(spacing_xyz)
        item.SetDirection(direction)
        item.SetOrigin(origin)
        out.append(item)
    return out[0], out[1]
