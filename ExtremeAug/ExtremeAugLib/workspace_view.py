"""Read-only view of a workspace's manifest (``extremeaug.json``): structures, cases, versions.

The engine rewrites the manifest atomically, so reading the JSON directly is safe. Every
reader here returns an empty answer for a folder that is not (yet) a workspace, and for a
manifest that breaks the workspace rules (``ExtremeAugLogic.manifest_check``, the same
check the engine applies); ``manifestProblem`` says why in one line.
"""

import json
from pathlib import Path

from ExtremeAugLogic import contract
from ExtremeAugLogic.errors import InputError
from ExtremeAugLogic.manifest_check import check_manifest

MANIFEST_FILE = contract.MANIFEST_NAME
MAX_CASE_ID_LENGTH = contract.MAX_CASE_ID_LENGTH


def manifestPath(workspace):
    return Path(workspace) / MANIFEST_FILE


def isWorkspace(workspace):
    return bool(workspace) and manifestPath(workspace).is_file()


def _rawManifest(workspace):
    try:
        data = json.loads(manifestPath(workspace).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def readManifest(workspace):
    """The manifest as a dict; {} when missing, unreadable or refused by the workspace rules."""
    data = _rawManifest(workspace)
    if not data or manifestProblem(workspace, data):
        return {}
    return data


def manifestProblem(workspace, data=None):
    """The one-line reason the workspace's manifest is refused, or None when it is acceptable (or absent)."""
    if data is None:
        try:
            data = json.loads(manifestPath(workspace).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            return f"{manifestPath(workspace)}: damaged manifest ({error})"
    if not isinstance(data, dict):
        return f"{manifestPath(workspace)}: damaged manifest (not a JSON object)"
    try:
        check_manifest(data, manifestPath(workspace))
    except InputError as error:
        return str(error)
    return None


def structureNames(workspace):
    """``{label value: structure name}`` of the workspace."""
    names = {}
    for key, name in (readManifest(workspace).get("structures") or {}).items():
        try:
            names[int(key)] = str(name)
        except (TypeError, ValueError):
            continue
    return dict(sorted(names.items()))


def valueForName(workspace):
    """``{structure name: label value}`` (the inverse of ``structureNames``)."""
    return {name: value for value, name in structureNames(workspace).items()}


def cases(workspace):
    return [c for c in readManifest(workspace).get("cases") or [] if isinstance(c, dict)]


def caseIds(workspace):
    return [str(c.get("id")) for c in cases(workspace)]


def bestVersion(workspace):
    return readManifest(workspace).get("best_version")


def versionRows(workspace):
    """One row per model version, oldest first: name, status, validation Dice (or None), best, and its score.

    ``score`` is the validation Dice, or without one the version's test-then-train Dice (its
    predictions against their accepted corrections; ``testScans`` of them); ``scoreSource``
    says which ("validation", "test-then-train" or None). ``trialAgainst``: the version a best
    model on trial must beat (see docs/architecture.md).
    """
    manifest = readManifest(workspace)
    best = manifest.get("best_version")
    lockPath = Path(workspace) / contract.TRAIN_LOCK_NAME
    tested = contract.test_then_train_scores(manifest.get("cases") or [])
    rows = []
    for record in manifest.get("versions") or []:
        if not isinstance(record, dict):
            continue
        scores = record.get("val_scores") or {}
        dice = scores.get("mean_dice") if isinstance(scores, dict) else None
        dice = float(dice) if isinstance(dice, (int, float)) else None
        test = tested.get(record.get("name"))
        rows.append({
            "name": str(record.get("name", "?")),
            "status": contract.shown_version_status(record, lockPath),
            "valDice": dice,
            "isBest": record.get("name") == best,
            "casesSeen": len(record.get("cases_seen") or []),
            "testDice": test["mean_dice"] if test else None,
            "testScans": test["scans"] if test else 0,
            "score": dice if dice is not None else (test["mean_dice"] if test else None),
            "scoreSource": "validation" if dice is not None else ("test-then-train" if test else None),
            "trialAgainst": record.get("trial_against"),
        })
    return rows


def roundRows(workspace):
    """The loop round by round, one row per accepted correction (``contract.round_rows``), as the engine's status."""
    manifest = readManifest(workspace)
    return contract.round_rows(manifest.get("cases") or [], manifest.get("versions") or [],
                               manifest.get("best_version"))


def queuedCases(workspace):
    """Training cases the best model has not trained on yet (``contract.queued_cases``)."""
    manifest = readManifest(workspace)
    return contract.queued_cases(manifest.get("cases") or [], manifest.get("versions") or [],
                                 manifest.get("best_version"))


def roundsChartPath(workspace):
    """``rounds.png`` of the workspace (drawn by the engine), or None while there is none."""
    if not workspace:
        return None
    path = Path(workspace) / contract.ROUNDS_CHART_NAME
    return path if path.is_file() else None


def newCaseId(workspace, baseName):
    """A safe case id from ``baseName`` (e.g. the volume's name), unique in the workspace."""
    stem = contract.safe_name_stem(baseName, MAX_CASE_ID_LENGTH - 4) or "case"
    # every id the file holds is taken, even in a manifest the rules refuse: ids are only compared here
    cases = _rawManifest(workspace).get("cases")
    taken = {str(c.get("id")).lower() for c in (cases if isinstance(cases, list) else []) if isinstance(c, dict)}
    candidate, number = stem, 1
    while candidate.lower() in taken:
        number += 1
        candidate = f"{stem}_{number}"
    return candidate




def worklistState(workspace, order=contract.SUGGESTED_ORDER):
    """The worklist scans with their waiting predictions (ready, stale, none), as the engine sees them."""
    return contract.worklist_rows(workspace, cases(workspace), bestVersion(workspace), order)
