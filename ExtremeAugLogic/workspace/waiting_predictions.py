"""The rival's worklist predictions, kept while a new best model is on trial.

Without validation cases a new best model is on trial against the version it replaced, and
the first corrected scan it predicted decides (``Workspace._judge_trial``). So that the two are
compared on the same scan, the predictor moves the rival's waiting prediction of each scan to
``predictions/worklist/previous/`` instead of overwriting it; if the new model is dropped, its
rival's predictions wait again at once, with nothing to predict.

Every move keeps the rule of the worklist predictions: a record only ever names the complete
label map beside it (record out first, label map, record in last).
"""

from __future__ import annotations

import os
from pathlib import Path

from ExtremeAugLogic import contract
from ExtremeAugLogic.workspace import locking


def _move(source: tuple, target: tuple) -> None:
    """Move a (label map, record) pair onto another slot: the target's record out first, then the
    label map, its record last (a killed move leaves no record naming a missing or foreign label map)."""
    (label, record), (target_label, target_record) = source, target
    target_record.parent.mkdir(parents=True, exist_ok=True)
    target_record.unlink(missing_ok=True)
    os.replace(label, target_label)
    os.replace(record, target_record)


def keep_as_previous(workspace_path: Path, case_id: str) -> None:
    """Move the waiting prediction of ``case_id`` to the previous slot (the caller holds the worklist lock)."""
    _move(contract.worklist_prediction_files(workspace_path, case_id),
          contract.previous_prediction_files(workspace_path, case_id))


def restore_previous(workspace_path: Path, case_ids: list[str], version: str) -> list[str]:
    """Make the kept predictions of ``version`` wait again for those of ``case_ids`` that have one.

    Only while no predictor is at work (the worklist lock is free); otherwise nothing moves and
    the predictor redoes the stale scans. Returns the case ids restored.
    """
    workspace_path = Path(workspace_path)
    handle = locking.try_acquire(workspace_path / contract.WORKLIST_LOCK_NAME)
    if handle is None:
        return []
    try:
        restored = []
        for case_id in case_ids:
            kept = contract.read_previous_prediction(workspace_path, case_id)
            if kept is None or kept["version"] != version:
                continue
            _move(contract.previous_prediction_files(workspace_path, case_id),
                  contract.worklist_prediction_files(workspace_path, case_id))
            restored.append(case_id)
        return restored
    finally:
        locking.release(handle)


def forget(workspace_path: Path, case_id: str) -> None:
    """Remove the kept prediction of a scan that left the worklist (record first)."""
    kept_label, kept_record = contract.previous_prediction_files(workspace_path, case_id)
    kept_record.unlink(missing_ok=True)
    kept_label.unlink(missing_ok=True)
