"""Read, validate and write scans and label maps.

Every check raises :class:`InputError` with a one-line message that starts with the file
(or name) at fault. Nothing here knows about workspaces.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from ExtremeAugLogic.workspace import atomic
from ExtremeAugLogic.errors import InputError

GRID_TOLERANCE = 1e-4  # relative tolerance for spacing/origin, absolute for direction
MAX_LABEL_VALUE = 65535


# ---------------------------------------------------------------- reading files


def case_spacing_zyx(image: sitk.Image) -> tuple:
    """Spacing of a SimpleITK image in array order (z, y, x)."""
    return tuple(float(s) for s in reversed(image.GetSpacing()))


def case_shape_zyx(image: sitk.Image) -> tuple:
    """Size of a SimpleITK image in array order (z, y, x)."""
    return tuple(int(s) for s in reversed(image.GetSize()))


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read a 3D scalar scan as float32; raise InputError if it is not usable."""
    image = _read_file(path)
    return check_image(image, name=str(path))


def read_label(path: str | os.PathLike, reference: Optional[sitk.Image] = None,
               reference_name: Optional[str] = None, allow_empty: bool = False) -> sitk.Image:
    """Read a label map (UInt8, or UInt16 if a value exceeds 255) and validate it.

    With ``reference`` the label must lie on the same voxel grid; ``reference_name``
    (e.g. the scan's file name) is used in the error message.
    """
    label = _read_file(path)
    return check_label_image(label, reference=reference, name=str(path),
                             reference_name=reference_name, allow_empty=allow_empty)


def _read_file(path: str | os.PathLike) -> sitk.Image:
    """Read any file SimpleITK understands, turning every failure into one InputError."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{path}: not found")
    if p.is_dir():
        raise InputError(f"{path}: is a folder, not an image file")
    try:
        return sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise InputError(f"{path}: cannot be read as an image ({_short_itk_reason(exc)})") from None


def _short_itk_reason(exc: Exception) -> str:
    """A short, one-line reason from a (long, multi-line) ITK exception."""
    text = " ".join(str(exc).split())
    if "Unable to determine ImageIO reader" in text:
        return "unknown format or not an image file"
    for marker in ("itk::ERROR:", "Description:"):
        if marker in text:
            text = text.split(marker)[-1].strip()
    text = text.strip(" :")
    if len(text) > 160:
        text = text[:157] + "..."
    return text or "unreadable or corrupt file"


# ---------------------------------------------------------------- checking images

def check_image(image: sitk.Image, name: str = "image") -> sitk.Image:
    """Validate an in-memory scan (3D, one component, finite); return it as float32."""
    image = _as_3d(image, name, what="scan")
    image = sitk.Cast(image, sitk.sitkFloat32)
    values = sitk.GetArrayViewFromImage(image)
    bad = values.size - int(np.count_nonzero(np.isfinite(values)))
    if bad:
        raise InputError(f"{name}: contains {bad} NaN or infinite intensity value(s)")
    return image


def check_label_image(label: sitk.Image, reference: Optional[sitk.Image] = None,
                      name: str = "label", reference_name: Optional[str] = None,
                      allow_empty: bool = False) -> sitk.Image:
    """Validate an in-memory label map; return it as UInt8 (or UInt16 if max > 255).

    Errors: not 3D, several components, non-integer, negative or too large values,
    all zero (unless ``allow_empty``), or a grid differing from ``reference``.
    """
    label = _as_3d(label, name, what="label map")
    if reference is not None:
        diff = grid_difference(label, reference)
        if diff:
            ref = f"image {reference_name}" if reference_name else "the image"
            raise InputError(f"{name}: grid differs from {ref}: {diff}")
    values = sitk.GetArrayViewFromImage(label)
    _check_label_values(values, name)
    top = int(values.max()) if values.size else 0
    if top == 0 and not allow_empty:
        raise InputError(f"{name}: label map is empty (every voxel is 0); delineate at least one structure")
    dtype = np.uint8 if top <= 255 else np.uint16
    out = sitk.GetImageFromArray(np.asarray(values).astype(dtype))
    out.CopyInformation(label)
    return out


def _check_label_values(values: np.ndarray, name: str) -> None:
    """Raise InputError unless every value is a whole number in 0..MAX_LABEL_VALUE."""
    kind = values.dtype.kind
    if kind not in "iuf":
        raise InputError(f"{name}: label voxels have unsupported type {values.dtype}; need integers")
    if kind == "f":
        finite = np.isfinite(values)
        if not finite.all():
            raise InputError(f"{name}: label map contains NaN or infinite values")
        fractional = values != np.round(values)
        if fractional.any():
            example = float(values[fractional].flat[0])
            raise InputError(f"{name}: label map has non-integer values (e.g. {example:g}); "
                             "labels must be whole numbers 0, 1, 2, ...")
    if values.size == 0:
        return
    low, high = values.min(), values.max()
    if low < 0:
        raise InputError(f"{name}: label map has negative values (min {low:g})")
    if high > MAX_LABEL_VALUE:
        raise InputError(f"{name}: label value {high:g} is too large (max {MAX_LABEL_VALUE})")


def _as_3d(image: sitk.Image, name: str, what: str) -> sitk.Image:
    """Return ``image`` as a 3D single-component image (a 4D one with one frame is squeezed)."""
    if not isinstance(image, sitk.Image):
        raise InputError(f"{name}: not an image (got {type(image).__name__})")
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise InputError(f"{name}: has {components} components per voxel (colour or vector image); "
                         f"need a single-channel 3D {what}")
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        size = list(image.GetSize()[:3]) + [0]
        image = sitk.Extract(image, size, [0, 0, 0, 0])
        dim = 3
    if dim != 3:
        size = "x".join(str(s) for s in image.GetSize())
        raise InputError(f"{name}: is {dim}D (size {size}); need a 3D {what}")
    if 0 in image.GetSize():
        raise InputError(f"{name}: has no voxels")
    return image


# ---------------------------------------------------------------- grids

def grid_difference(a: sitk.Image, b: sitk.Image, tolerance: float = GRID_TOLERANCE) -> Optional[str]:
    """Describe how the voxel grids of ``a`` and ``b`` differ, or None if they match.

    Size must match exactly; spacing and origin within ``tolerance`` relative to their
    magnitude (origin: at least relative to the voxel spacing); direction within
    ``tolerance`` absolute.
    """
    if a.GetDimension() != b.GetDimension():
        return f"dimension {a.GetDimension()} vs {b.GetDimension()}"
    if tuple(a.GetSize()) != tuple(b.GetSize()):
        return f"size {tuple(a.GetSize())} vs {tuple(b.GetSize())}"
    sa, sb = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    if not np.allclose(sa, sb, rtol=tolerance, atol=0):
        return f"spacing {_fmt(sa)} vs {_fmt(sb)}"
    oa, ob = np.array(a.GetOrigin()), np.array(b.GetOrigin())
    scale = max(1.0, float(np.abs(oa).max()), float(np.abs(ob).max()), float(sa.max()))
    if np.abs(oa - ob).max() > tolerance * scale:
        return f"origin {_fmt(oa)} vs {_fmt(ob)}"
    da, db = np.array(a.GetDirection()), np.array(b.GetDirection())
    if np.abs(da - db).max() > tolerance:
        return f"direction {_fmt(da)} vs {_fmt(db)}"
    return None


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = GRID_TOLERANCE) -> bool:
    """True when ``a`` and ``b`` share size, spacing, origin and direction."""
    return grid_difference(a, b, tolerance) is None


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


# ---------------------------------------------------------------- misc

def label_values(label: sitk.Image) -> list[int]:
    """Sorted non-zero values present in ``label``."""
    values = np.unique(sitk.GetArrayViewFromImage(label))
    return [int(v) for v in values if v != 0]


def write_image(image: sitk.Image, path: str | os.PathLike) -> None:
    """Write ``image`` atomically (compressed), creating parent folders."""
    atomic.write_with(path, lambda tmp: sitk.WriteImage(image, str(tmp), True))
