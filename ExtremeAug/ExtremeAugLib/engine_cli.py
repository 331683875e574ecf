"""Argument lists for the engine's command line (``python -m ExtremeAugLogic ...``).

Always lists, never shell strings: every path is one element, so spaces, quotes and
non-ASCII characters reach the engine intact on every platform. The engine package
``ExtremeAugLogic`` sits next to ``ExtremeAug.py`` in an installed extension and one folder
up in the source tree; ``findEngineRoot`` finds the folder that contains it.
"""

import json
import os
import subprocess
from pathlib import Path

from ExtremeAugLogic import contract, launcher

ENGINE_PACKAGE = launcher.ENGINE_PACKAGE
MODEL_TYPES = contract.MODEL_KINDS
DEVICES = contract.DEVICES


class EngineError(RuntimeError):
    """The engine exited with an error; the message is its last stderr line."""


def findEngineRoot(moduleDir=None):
    """The folder holding the ``ExtremeAugLogic`` package (installed layout first, then source tree)."""
    moduleDir = Path(moduleDir or Path(__file__).resolve().parents[1])
    for candidate in (moduleDir, moduleDir.parent):
        if (candidate / ENGINE_PACKAGE / "__init__.py").is_file():
            return candidate
    raise RuntimeError(f"The ExtremeAug engine ({ENGINE_PACKAGE}) was not found next to {moduleDir}; "
                       "reinstall the extension.")


def engineEnvironment(engineRoot, baseEnvironment=None):
    """Environment for an engine process: engine folder first on PYTHONPATH, unbuffered output."""
    return launcher.engineEnvironment(engineRoot, baseEnvironment)


def baseCommand(pythonExecutable):
    return launcher.engineCommand(pythonExecutable)


def initCommand(pythonExecutable, workspace):
    return baseCommand(pythonExecutable) + ["init", os.fspath(workspace)]


def addCommand(pythonExecutable, workspace, image, label, caseId=None, correctedFrom=None, names=None,
               predictedBy=None):
    """``add``: one delineated or corrected scan (``label`` None: a scan for the worklist);
    ``names`` maps label value -> structure name; ``predictedBy``: the model version that made
    ``correctedFrom``."""
    args = baseCommand(pythonExecutable) + ["add", os.fspath(workspace), "--image", os.fspath(image)]
    if label is not None:
        args += ["--label", os.fspath(label)]
    if caseId:
        args += ["--case-id", str(caseId)]
    if correctedFrom:
        args += ["--corrected-from", os.fspath(correctedFrom)]
    if predictedBy:
        args += ["--predicted-by", str(predictedBy)]
    if names:
        args += ["--names", json.dumps({str(int(k)): str(v) for k, v in names.items()}, ensure_ascii=False)]
    return args


def trainCommand(pythonExecutable, workspace, minutes=None, iterations=None, level=None, device=None,
                 resume=False, initFrom=None, modelType=None, processes=1):
    """``train``: a time (minutes) or iteration budget, never both.

    ``processes`` > 1: the same command under torchrun from the same Python (one process per
    GPU, or several CPU processes), e.g. ``[python, -m, torch.distributed.run, --standalone,
    --nproc-per-node, 2, -m, ExtremeAugLogic, train, ...]``.
    """
    if minutes is not None and iterations is not None:
        raise ValueError("Give a training budget in minutes or in iterations, not both.")
    args = launcher.engineCommand(pythonExecutable, "train", os.fspath(workspace), processes=int(processes or 1))
    if minutes is not None:
        if not float(minutes) > 0:
            raise ValueError(f"Training minutes must be positive, got {minutes}.")
        args += ["--minutes", _number(minutes)]
    if iterations is not None:
        if int(iterations) < 1:
            raise ValueError(f"Training iterations must be at least 1, got {iterations}.")
        args += ["--iterations", str(int(iterations))]
    if level is not None:
        if int(level) < 0:
            raise ValueError(f"Augmentation level must be 0 (unlimited) or more, got {level}.")
        args += ["--level", str(int(level))]
    if device:
        args += ["--device", checkDevice(device)]
    if resume:
        args.append("--resume")
    if initFrom:
        args += ["--init-from", str(initFrom)]
    if modelType:
        if modelType not in MODEL_TYPES:
            raise ValueError(f"Model type must be one of {', '.join(MODEL_TYPES)}, got {modelType!r}.")
        args += ["--model", modelType]
    return args


def predictCommand(pythonExecutable, workspace, image, output, version=None, device=None):
    """``predict``: ``version`` is vN, best (default) or latest."""
    args = baseCommand(pythonExecutable) + ["predict", os.fspath(workspace),
                                            "--image", os.fspath(image), "--output", os.fspath(output)]
    if version:
        args += ["--version", str(version)]
    if device:
        args += ["--device", checkDevice(device)]
    return args


def evaluateCommand(pythonExecutable, prediction, reference):
    return baseCommand(pythonExecutable) + ["evaluate", "--prediction", os.fspath(prediction),
                                            "--reference", os.fspath(reference)]


def checkDevice(device):
    """``device`` if it is auto, cpu, cuda, cuda:N or mps; else ValueError."""
    try:
        return contract.check_device(device)
    except ValueError:
        raise ValueError(f"Device must be one of {', '.join(DEVICES)} or cuda:N, got {device!r}.") from None


def _number(value):
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def lastLine(text):
    """The last non-empty line of ``text`` ('' if none)."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def runEngine(args, engineRoot, timeout=600):
    """Run a short engine command to completion; its stdout, or EngineError with its stderr's last line.

    For quick steps only (init, add, evaluate); training and prediction run in the
    background through ``training_process.EngineProcess``.
    """
    completed = subprocess.run(args, cwd=os.fspath(engineRoot), env=engineEnvironment(engineRoot),
                               stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    if completed.returncode != 0:
        message = lastLine(completed.stderr) or lastLine(completed.stdout) or f"exit code {completed.returncode}"
        raise EngineError(f"ExtremeAug engine '{args[3] if len(args) > 3 else ''}' failed: {message}")
    return completed.stdout
