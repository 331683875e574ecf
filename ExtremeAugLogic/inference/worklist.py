"""Predictions waiting for the clinician: every worklist scan predicted by the best model.

Each prediction is written beside a small record of the model version that made it
(``predictions/worklist/<case>.nii.gz`` and ``<case>.json``): the old record is removed
first, then the label map and the record are written, each atomically, so a record only
ever names the label map beside it; a prediction killed half way leaves no record (the scan
reads as having no prediction) and is simply made again. A record naming another version
than today's best model is stale and is redone. One process predicts the worklist at a time
(``.worklist.lock``); it first removes the temporary files a killed one left behind.
Each record also carries an uncertainty: the mean normalised entropy of the class
probabilities inside the predicted structures (0 = certain, 1 = uniform), 1.0 when the model
found nothing.

When the best model is on trial against another version (no validation cases: the first
corrected scan it predicted decides), the rival's waiting predictions are not thrown away but
kept in ``predictions/worklist/previous/`` (moved label map first, then its record): the
correction then scores both models on the same scan, and a model dropped after its trial hands
the worklist back to the rival's predictions without predicting again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ExtremeAugLogic import contract
from ExtremeAugLogic.devices import resolve_device
from ExtremeAugLogic.inference.level_range import guide_for_version
from ExtremeAugLogic.inference.predict import labels_from_probabilities, load_model, to_label_image
from ExtremeAugLogic.workspace.imageio import case_spacing_zyx
from ExtremeAugLogic.workspace import atomic, imageio, locking, waiting_predictions
from ExtremeAugLogic.workspace.status import now_iso


def uncertainty(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean normalised entropy inside the predicted structures; 1.0 when there are none."""
    foreground = labels > 0
    if not foreground.any():
        return 1.0
    p = np.clip(probabilities[:, foreground], 1e-8, 1.0)
    entropy = -(p * np.log(p)).sum(axis=0) / np.log(probabilities.shape[0])
    return float(entropy.mean())


def predict_worklist(workspace, device: str = "auto", log=None) -> list[dict]:
    """Predict every worklist scan whose waiting prediction is missing or stale; returns what was done."""
    handle = locking.acquire_blocking(workspace.path / contract.WORKLIST_LOCK_NAME)
    try:
        _remove_leftovers(workspace.path / contract.WORKLIST_PREDICTIONS_DIR)
        _remove_leftovers(workspace.path / contract.WORKLIST_PREVIOUS_DIR)
        best = workspace.best_version()
        todo = [row for row in workspace.worklist_state() if row["state"] != "ready"]
        if best is None or not todo:
            return []
        rival = workspace.version(best).get("trial_against")
        device = resolve_device(device)
        recipe, config, model, name = load_model(workspace, best, device)
        guide = guide_for_version(workspace, name, config)
        done = []
        for row in todo:
            image = imageio.read_image(workspace.image_path(row["id"]))
            probabilities = recipe.predict_probabilities(model, config, image, device)
            labels = labels_from_probabilities(probabilities, config, spacing=case_spacing_zyx(image),
                                               level_range=guide.range_for(image) if guide else None)
            label_path, record_path = workspace.worklist_prediction_files(row["id"])
            if rival is not None and row["state"] == "stale" and row["version"] == rival:
                waiting_predictions.keep_as_previous(workspace.path, row["id"])
            record_path.unlink(missing_ok=True)  # first: no record may name the label map being replaced
            imageio.write_image(to_label_image(labels, image), label_path)
            record = {"version": name, "uncertainty": round(uncertainty(probabilities, labels), 5),
                      "predicted_at": now_iso(), "foreground_voxels": int((labels > 0).sum())}
            atomic.write_json(record_path, record)  # last: a record only ever names a complete label map
            done.append({"id": row["id"], **record})
            if log:
                log(f"predicted {row['id']} with {name} (uncertainty {record['uncertainty']:.3f})")
        return done
    finally:
        locking.release(handle)


def _remove_leftovers(folder: Path) -> None:
    """Delete the temporary files (``.<name>.*``) of atomic writes a killed predictor left in ``folder``.

    Only called under the worklist lock: no other process is writing there then.
    """
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name.startswith(".") and path.is_file():
                path.unlink(missing_ok=True)
