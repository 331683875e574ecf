"""The background engine process (training or prediction) and the training status file.

The process itself is the engine's one launcher (``ExtremeAugLogic.launcher``: start, stop
the whole tree, logs); the names of the status file and its phases come from the workspace
contract (``ExtremeAugLogic.contract``). This module adds the panel's reading of the status
file, which never raises.
"""

import json
from pathlib import Path

from ExtremeAugLogic import contract
from ExtremeAugLogic.launcher import (EngineProcess, defaultPythonExecutable, pidExists, psutil,  # noqa: F401
                                      signalProcessTree)

STATUS_FILE = contract.STATUS_NAME
TERMINAL_PHASES = contract.FINAL_PHASES
RUNNING_PHASES = contract.RUNNING_PHASES
DEFAULT_STATUS = {
    "phase": "unknown", "iteration": 0, "total": 0, "loss": None, "val_dice": None, "eta_s": None,
    "version": None, "error": None, "pid": None, "started_at": None, "updated_at": None, "message": "",
}
_NUMBER_FIELDS = {"iteration": int, "total": int, "loss": float, "val_dice": float, "eta_s": float, "pid": int}


# ------------------------------------------------------------------ status

def readStatus(workspace):
    """The training status of ``workspace`` as a dict with every field of DEFAULT_STATUS.

    Never raises: a missing file gives phase "unknown" ("no training yet"), a partial or
    corrupt file (e.g. read while the engine replaces it) gives phase "unknown" with a
    message; wrongly typed numbers become None.
    """
    status = dict(DEFAULT_STATUS)
    path = Path(workspace) / STATUS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        status["message"] = "no training has run in this workspace yet"
        return status
    except OSError as error:
        status["message"] = f"status file unreadable: {error}"
        return status
    try:
        data = json.loads(text)
    except ValueError:
        status["message"] = "status file is being written"
        return status
    if not isinstance(data, dict):
        status["message"] = "status file has an unexpected format"
        return status
    status.update(data)
    for field, kind in _NUMBER_FIELDS.items():
        status[field] = _asNumber(status.get(field), kind, DEFAULT_STATUS[field])
    if "world_size" in status:  # training processes (torchrun); absent: one
        status["world_size"] = _asNumber(status["world_size"], int, 1)
    status["phase"] = str(status.get("phase") or "unknown")
    status["message"] = str(status.get("message") or "")
    return status


def _asNumber(value, kind, default):
    if value is None or isinstance(value, bool):
        return default
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        return default
    if kind is float and number != number:  # NaN
        return None
    return number


def isTerminalPhase(phase):
    return phase in TERMINAL_PHASES
