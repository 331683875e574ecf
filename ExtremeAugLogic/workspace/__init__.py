"""The workspace folder: the contract between the Slicer module and the training process.

- ``workspace``: the manifest (cases, fixed validation split, model versions), nnU-Net layout.
- ``imageio``: reading and validating scans and label maps; writing them atomically.
- ``atomic``: atomic file writes (temp file, fsync, rename).
- ``locking``: the manifest lock and the one-trainer lock (kernel-released ``flock``).
- ``status``: the live training status file.
"""

from ExtremeAugLogic.workspace.workspace import (NO_VALIDATION_REASON, CaseData, Workspace, auto_split,
                                                 case_id_from_filename, validate_case_id)

__all__ = ["NO_VALIDATION_REASON", "CaseData", "Workspace", "auto_split", "case_id_from_filename",
           "validate_case_id"]
