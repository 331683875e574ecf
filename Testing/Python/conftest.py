"""Shared pytest setup: tiny synthetic images.

The engine is the installed package (``pip install -e .``); the Slicer module's folder goes on
``sys.path`` as Slicer itself puts it there, so ``ExtremeAugLib`` imports as in the application.
"""

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO_ROOT / "ExtremeAug"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))


def _make_scan_and_label(size=(16, 16, 8), spacing=(1.0, 1.0, 2.0), values=(1, 2), seed=0):
    """A float32 scan with bright boxes and the matching label map (SimpleITK images)."""
    import numpy as np
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    nx, ny, nz = size
    label = np.zeros((nz, ny, nx), np.uint8)
    for i, value in enumerate(values):
        x0 = 2 + 5 * i
        label[1:nz - 1, 3:ny - 3, x0:x0 + 4] = value
    scan = (rng.normal(0.0, 0.1, label.shape) + label).astype(np.float32)
    images = []
    for array in (scan, label):
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(spacing)
        img.SetOrigin((-10.0, 5.0, 3.0))
        images.append(img)
    return images[0], images[1]


@pytest.fixture
def make_case():
    """``make_case(size=..., spacing=..., values=..., seed=...) -> (scan, label)`` SimpleITK images."""
    return _make_scan_and_label


def _train_tiny_phantom_model(folder: Path, seed0: int = 5, **settings):
    """A workspace in ``folder`` with one 48x48x24 phantom scan and a tiny 2D model trained 3 iterations.

    Returns ``(workspace, pairs)``: ``pairs`` are two phantom (image, label) paths, the first one trained on.
    ``settings`` are added to (or replace) the tiny recipe settings.
    """
    from ExtremeAugLogic.demo import phantom
    from ExtremeAugLogic.training import TrainRequest, train
    from ExtremeAugLogic.workspace import Workspace

    data = folder / "data"
    data.mkdir()
    pairs = phantom.write_phantom_set(data, 2, seed0=seed0, shape=(48, 48, 24), spacing=(4.0, 4.0, 4.0))
    ws = Workspace.create(folder / "ws", structure_names=phantom.phantom_names("vertebrae"))
    ws.add_case(*pairs[0])
    tiny = {"inplane_size": 48, "patch_size": 48, "stride": 24, "base_features": 4, "depth": 3, "max_features": 16,
            "batch_size": 4, **settings}
    train(TrainRequest(str(ws.path), iterations=3, settings=tiny, progress_bar=False))
    return ws, pairs


@pytest.fixture
def tiny_phantom_model(tmp_path):
    """``tiny_phantom_model(seed0=5, **settings) -> (workspace, pairs)``: a 3-iteration 2D model on a phantom."""
    return lambda seed0=5, **settings: _train_tiny_phantom_model(tmp_path, seed0, **settings)
