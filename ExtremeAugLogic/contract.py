"""The workspace contract: what the engine and the Slicer module must agree on.

Standard library only: the Slicer side imports this module before the engine's own
dependencies (torch, monai) are installed. Anything both sides read or write about a
workspace folder is named here once: file and folder names, the status phases, the model
kinds and devices, the rule for case ids and version names, and how to tell whether the
process that owns a workspace is still alive. ``Testing/Python/test_layout.py`` fails if
either side keeps its own copy.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

try:  # POSIX advisory locks, released by the kernel when their process dies
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

# ---------------------------------------------------------------- files and folders
MANIFEST_NAME = "extremeaug.json"
DATASET_JSON_NAME = "dataset.json"
STATUS_NAME = "status.json"
TRAIN_LOCK_NAME = "train.lock"
MANIFEST_LOCK_NAME = ".manifest.lock"
IMAGES_DIR = "imagesTr"
LABELS_DIR = "labelsTr"
PREDICTIONS_DIR = "predictions"
MODELS_DIR = "models"
FILE_ENDING = ".nii.gz"
MODEL_WEIGHTS_NAME = "model.pt"
CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.json"
VERSION_RECORD_NAME = "version.json"

WORKLIST_SPLIT = "worklist"  # a scan without a label yet
WORKLIST_PREDICTIONS_DIR = f"{PREDICTIONS_DIR}/worklist"
# the worklist predictions of the model a new best is on trial against, kept for a paired trial
WORKLIST_PREVIOUS_DIR = f"{WORKLIST_PREDICTIONS_DIR}/previous"
WORKLIST_ORDERS = ("added", "uncertainty")
# the order status, the console and the panel's Next scan follow: the order the scans were added, since
# the most-uncertain-first order cost more correction for no better model (docs/results/loop-vb.md)
SUGGESTED_ORDER = "added"
# a warm-started retrain (--init-from) gets this share of the first training's budget by default: in the
# loop benchmark 2 warm minutes after a correction beat the 8-minute model it started from (docs/results/loop-vb.md)
RETRAIN_FRACTION = 0.25
WORKLIST_LOCK_NAME = ".worklist.lock"  # held while the worklist is predicted
ROUNDS_CHART_NAME = "rounds.png"  # Dice and correction effort round by round
CORRECTED_STATUS = "corrected"  # a case whose label was corrected from a model's prediction

# ---------------------------------------------------------------- training status
RUNNING_PHASES = ("starting", "preparing", "training", "validating", "saving")
FINAL_PHASES = ("done", "stopped", "failed")
PHASES = RUNNING_PHASES + FINAL_PHASES

# ---------------------------------------------------------------- model versions
VERSION_TRAINING = "training"
VERSION_DONE = "done"
VERSION_STOPPED = "stopped"
VERSION_FAILED = "failed"
VERSION_INTERRUPTED = "interrupted"  # its trainer died without a word (kill -9, power loss)
VERSION_STATUSES = (VERSION_TRAINING, VERSION_DONE, VERSION_STOPPED, VERSION_FAILED, VERSION_INTERRUPTED)
RESUMABLE_STATUSES = (VERSION_STOPPED, VERSION_FAILED, VERSION_INTERRUPTED)

# ---------------------------------------------------------------- choices
MODEL_KINDS = ("2d", "3d")
DEFAULT_MODEL_KIND = "2d"
DEVICES = ("auto", "cpu", "cuda", "mps")

# ---------------------------------------------------------------- names
MAX_CASE_ID_LENGTH = 64
_NAME_CHARACTERS = re.compile(r"^[A-Za-z0-9._-]+$")


def name_problem(name, what: str = "case id") -> Optional[str]:
    """Why ``name`` is not a safe file-name stem (case id, version name), or None if it is.

    The rule: non-empty text of at most 64 letters, digits, '.', '_' and '-', not starting
    with '.' and without '..'; so a name can never leave its folder.
    """
    if not isinstance(name, str) or not name:
        return f"{what} must be a non-empty text"
    if len(name) > MAX_CASE_ID_LENGTH:
        return f"{what} is longer than {MAX_CASE_ID_LENGTH} characters"
    if "/" in name or "\\" in name or os.sep in name:
        return f"{what} must not contain a path separator"
    if name.startswith(".") or ".." in name:
        return f"{what} must not start with '.' or contain '..'"
    if not _NAME_CHARACTERS.match(name):
        return f"{what} may only use letters, digits, '.', '_' and '-'"
    return None


def safe_name_stem(text, limit: int = MAX_CASE_ID_LENGTH) -> str:
    """``text`` with every character outside the rule replaced, trimmed to ``limit`` ('' if nothing is left)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text or ""))
    return re.sub(r"\.{2,}", ".", stem).strip("._-")[:limit].rstrip(".")


def check_device(device) -> str:
    """``device`` if it names auto, cpu, cuda, cuda:N or mps; else ValueError."""
    name, _, index = str(device).partition(":")
    if name not in DEVICES or (index and (name != "cuda" or not index.isdigit())):
        raise ValueError(f"device must be one of {', '.join(DEVICES)} or cuda:N, got {device!r}")
    return str(device)


# ---------------------------------------------------------------- liveness

def pid_alive(pid) -> bool:
    """Whether a process with ``pid`` exists (one we may not signal counts as alive)."""
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, ValueError, OverflowError):
        return False
    return True


def lock_holder(path) -> Optional[int]:
    """The pid holding the training lock at ``path``, or None when no live process holds it.

    The lock is an ``flock`` on the file; the kernel drops it when its process dies, so a
    pid left in the file by a killed trainer does not count.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    pid = int(text) if text.isdigit() else None
    if fcntl is None:  # pragma: no cover - Windows: the pid alone
        return pid if pid_alive(pid) else None
    try:
        handle = open(path, "rb")
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return pid or -1  # held, by a process that has not written its pid yet
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return None


def shown_version_status(record: dict, lock_path) -> str:
    """A version's status as both sides show it.

    ``training`` becomes ``interrupted`` once its trainer is gone: no live process holds the
    training lock and the process that recorded it (``pid``) no longer exists.
    """
    status = str(record.get("status", "?"))
    if status != VERSION_TRAINING:
        return status
    if lock_holder(lock_path) is not None or pid_alive(record.get("pid")):
        return status
    return VERSION_INTERRUPTED


# ---------------------------------------------------------------- the worklist's waiting predictions

def worklist_prediction_files(workspace, case_id: str) -> tuple:
    """(label map, record) of the prediction waiting for worklist scan ``case_id``."""
    return _prediction_files(Path(workspace) / WORKLIST_PREDICTIONS_DIR, case_id)


def previous_prediction_files(workspace, case_id: str) -> tuple:
    """(label map, record) of the prediction ``case_id`` had from the model that the best model is
    on trial against: kept so that the trial compares both models on the same corrected scan."""
    return _prediction_files(Path(workspace) / WORKLIST_PREVIOUS_DIR, case_id)


def _prediction_files(folder: Path, case_id: str) -> tuple:
    problem = name_problem(case_id, "case id")
    if problem:
        raise ValueError(f"{case_id!r}: {problem}")
    return folder / f"{case_id}{FILE_ENDING}", folder / f"{case_id}.json"


def read_waiting_prediction(workspace, case_id: str) -> Optional[dict]:
    """The record (model ``version``, ``uncertainty``) of a waiting prediction, or None if there is
    none usable: the label map is written before its record, so a record names a complete file."""
    return _read_prediction_record(*worklist_prediction_files(workspace, case_id))


def read_previous_prediction(workspace, case_id: str) -> Optional[dict]:
    """The record of the kept previous prediction of ``case_id`` (``previous_prediction_files``), or None."""
    return _read_prediction_record(*previous_prediction_files(workspace, case_id))


def _read_prediction_record(labels: Path, record_path: Path) -> Optional[dict]:
    import json

    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or name_problem(record.get("version"), "version") \
            or not isinstance(record.get("uncertainty"), (int, float)) or not labels.is_file():
        return None
    return record


def worklist_rows(workspace, cases: list, best_version, order: str = "added") -> list:
    """The worklist scans of ``cases`` (manifest entries) with their waiting prediction's state.

    ``state``: ready (made by ``best_version``), stale (by another version) or none.
    ``order``: added (as they joined), or uncertainty (ready ones first, most uncertain first).
    """
    if order not in WORKLIST_ORDERS:
        raise ValueError(f"{order}: worklist order must be one of {', '.join(WORKLIST_ORDERS)}")
    rows = []
    for case in cases:
        if not isinstance(case, dict) or case.get("split") != WORKLIST_SPLIT:
            continue
        case_id = str(case.get("id"))
        record = read_waiting_prediction(workspace, case_id)
        state = "none" if record is None else ("ready" if record["version"] == best_version else "stale")
        rows.append({"id": case_id, "state": state, "version": record["version"] if record else None,
                     "uncertainty": float(record["uncertainty"]) if record else None,
                     "prediction": str(worklist_prediction_files(workspace, case_id)[0]) if record else None,
                     "image": str(Path(workspace) / str(case.get("image")))})
    if order == "uncertainty":
        rows.sort(key=lambda r: (r["state"] != "ready", -(r["uncertainty"] or 0.0)))
    return rows


# ---------------------------------------------------------------- the loop, round by round

def _mean(values: list) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _tested(case) -> Optional[dict]:
    """The test-then-train scores of a case record, or None (none, or not numbers)."""
    scores = case.get("test_scores") if isinstance(case, dict) else None
    if not isinstance(scores, dict):
        return None
    numbers = [scores.get(key) for key in ("mean_dice", "binary_dice")]
    return scores if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers) else None


def test_then_train_scores(cases: list) -> dict:
    """Each model version's test-then-train score, from the corrected scans it predicted.

    ``{version: {"mean_dice", "binary_dice", "scans", "cases"}}``: the mean, over the corrected
    cases whose ``predicted_by`` names the version, of the Dice of that prediction against the
    accepted correction (``test_scores``, measured before the case joined training).
    """
    by_version: dict = {}
    for case in sorted((c for c in cases if isinstance(c, dict)), key=lambda c: c.get("order") or 0):
        scores, version = _tested(case), case.get("predicted_by")
        if scores is not None and isinstance(version, str):
            by_version.setdefault(version, []).append((str(case.get("id")), scores))
    return {version: {"mean_dice": _mean([s["mean_dice"] for _, s in rows]),
                      "binary_dice": _mean([s["binary_dice"] for _, s in rows]),
                      "scans": len(rows), "cases": [case_id for case_id, _ in rows]}
            for version, rows in by_version.items()}


def _seen_by(versions: list, name) -> set:
    record = next((v for v in versions if isinstance(v, dict) and v.get("name") == name), None)
    return set(record.get("cases_seen") or []) if record else set()


def round_rows(cases: list, versions: list, best_version) -> list:
    """The loop round by round: one row per accepted correction, in the order they were accepted.

    A round is a case whose label was corrected from a model's prediction (status
    ``corrected``). Its row: ``round`` (1, 2, ...), ``id``, ``accepted_at``, ``split``,
    ``predicted_by`` (the version whose prediction was corrected, None if unknown), the
    test-then-train ``mean_dice`` / ``binary_dice`` of that prediction against the correction,
    the effort (``changed_voxels``, ``slices_touched``, ``structures_changed``), ``trained_by``
    (the first finished version that trained on it, None while it waits) and ``in_best``
    (whether the best model trained on it).
    """
    in_best = _seen_by(versions, best_version)
    done = [v for v in versions if isinstance(v, dict) and v.get("status") == VERSION_DONE]
    rows = []
    corrected = [c for c in cases if isinstance(c, dict) and c.get("status") == CORRECTED_STATUS]
    for number, case in enumerate(sorted(corrected, key=lambda c: c.get("order") or 0), start=1):
        case_id, scores = str(case.get("id")), _tested(case) or {}
        rows.append({"round": number, "id": case_id, "accepted_at": case.get("added_at"), "split": case.get("split"),
                     "predicted_by": case.get("predicted_by"), "mean_dice": scores.get("mean_dice"),
                     "binary_dice": scores.get("binary_dice"), "changed_voxels": case.get("changed_voxels"),
                     "slices_touched": case.get("slices_touched"),
                     "structures_changed": case.get("structures_changed") or [],
                     "trained_by": next((v.get("name") for v in done if case_id in (v.get("cases_seen") or [])), None),
                     "in_best": case_id in in_best})
    return rows


def queued_cases(cases: list, versions: list, best_version) -> list:
    """Ids of the labelled training cases the best model has not trained on yet, oldest first.

    Accepted corrections (and delineated scans) wait here until a training that includes them
    becomes the best model; a training takes every training case there is when it starts.
    """
    seen = _seen_by(versions, best_version)
    ordered = sorted((c for c in cases if isinstance(c, dict)), key=lambda c: c.get("order") or 0)
    return [str(c.get("id")) for c in ordered if c.get("split") == "train" and c.get("id") not in seen]
