"""The compute device and the one mixed-precision policy, for training and prediction alike."""

from __future__ import annotations

import contextlib

import torch

from ExtremeAugLogic import contract
from ExtremeAugLogic.errors import InputError


def resolve_device(name: str = "auto") -> str:
    """Return a usable torch device string for ``name`` (auto, cpu, cuda, cuda:N, mps)."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    try:
        contract.check_device(name)
    except ValueError:
        raise InputError(f"{name}: device must be auto, cpu, cuda, cuda:N or mps") from None
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"{name}: CUDA is not available in this Python (torch {torch.__version__})")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("mps: Apple Metal is not available in this Python")
    return name


def is_gpu(device: str) -> bool:
    return str(device).startswith("cuda") or str(device) == "mps"


def autocast(device):
    """The mixed-precision context: bfloat16 on CUDA where supported (else float16), off elsewhere.

    bfloat16 keeps float32's range, so losses need no scaler; CPU and MPS run in full precision.
    """
    kind = torch.device(device).type
    if kind != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)
