"""Predictions waiting for the clinician: every worklist scan predicted by the best model.

Each prediction is written beside a small record of the model version that made it
(``predictions/worklist/<case>.nii.gz`` and ``<case>.json``): the label map first, the
record last, each atomically, so a prediction killed half way leaves no record and is simply
made again. A record naming another version than today's best model is stale and is redone.
Each record also carries an uncertainty: the mean normalised entropy of the class
probabilities inside the predicted structures (0 = certain, 1 = uniform), 1.0 when the model
found nothing.
"""

from __future__ import annotations

import numpy as np

from ExtremeAugLogic.devices import resolve_device
from ExtremeAugLogic.inference.predict import labels_from_probabilities, load_model, to_label_image
from ExtremeAugLogic.workspace import atomic, imageio
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
    best = workspace.best_version()
    todo = [row for row in workspace.worklist_state() if row["state"] != "ready"]
    if best is None or not todo:
        return []
    device = resolve_device(device)
    recipe, config, model, name = load_model(workspace, best, device)
    done = []
    for row in todo:
        image = imageio.read_image(workspace.image_path(row["id"]))
        probabilities = recipe.predict_probabilities(model, config, image, device)
        labels = labels_from_probabilities(probabilities, config)
        label_path, record_path = workspace.worklist_prediction_files(row["id"])
        imageio.write_image(to_label_image(labels, image), label_path)
        record = {"version": name, "uncertainty": round(uncertainty(probabilities, labels), 5),
                  "predicted_at": now_iso(), "foreground_voxels": int((labels > 0).sum())}
        atomic.write_json(record_path, record)  # last: a record only ever names a complete label map
        done.append({"id": row["id"], **record})
        if log:
            log(f"predicted {row['id']} with {name} (uncertainty {record['uncertainty']:.3f})")
    return done
