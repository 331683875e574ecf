"""Prediction: a model version applied to a scan (``predict``), and the label clean-up (``postprocess``)."""

from ExtremeAugLogic.inference.postprocess import DEFAULT_MIN_COMPONENT_FRACTION, remove_specks
from ExtremeAugLogic.inference.predict import (OBJECT_RULES, labels_from_probabilities, load_model, load_weights,
                                               predict_array, predict_file, read_config, save_model, to_label_image)

__all__ = ["DEFAULT_MIN_COMPONENT_FRACTION", "OBJECT_RULES", "labels_from_probabilities", "load_model", "load_weights", "predict_array", "predict_file",
           "read_config", "remove_specks", "save_model", "to_label_image"]
