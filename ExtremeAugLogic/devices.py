"""Training device choice: cuda, then mps, then cpu."""

from __future__ import annotations

from ExtremeAugLogic.errors import InputError


def resolve_device(name: str = "auto") -> str:
    """Return a usable torch device string for ``name`` (auto, cpu, cuda, cuda:N, mps)."""
    import torch

    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"{name}: CUDA is not available in this Python (torch {torch.__version__})")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("mps: Apple Metal is not available in this Python")
    if name != "cpu" and not name.startswith("cuda") and name != "mps":
        raise InputError(f"{name}: device must be auto, cpu, cuda, cuda:N or mps")
    return name


def is_gpu(device: str) -> bool:
    return device.startswith("cuda") or device == "mps"
