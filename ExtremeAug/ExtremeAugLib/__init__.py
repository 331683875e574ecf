"""Qt-free helpers of the ExtremeAug Slicer module.

Everything here runs both inside the Slicer application and in plain Python with the
``slicer-core`` package (real MRML classes, no Qt), which is how CI tests it:

- ``mrml_bridge``: MRML volume/segmentation nodes <-> SimpleITK images, exact geometry.
- ``headless_scene``: a scene wired like the application does, for use outside Slicer.
- ``engine_cli``: argument lists for ``python -m ExtremeAugLogic ...`` and where the engine is.
- ``training_process``: the background engine process (start, stop the whole tree, status).
- ``workspace_view``: read-only view of the workspace manifest (versions, structures, cases).
- ``prediction_job``: one background prediction (poll, cancel, result node).
- ``loop_logic``: the annotate-train-correct loop on MRML nodes (the module Logic's core).
- ``status_text``: short texts for the panel (phase, time left, numbers).
- ``training_chart``: the small live loss/Dice chart as a PNG.
"""

import sys as _sys
from pathlib import Path as _Path


def _putEngineOnPath():
    """Make ``ExtremeAugLogic`` importable: beside the module when installed, one folder up in the source tree.

    Only its standard-library modules (``contract``, ``launcher``) are imported into Slicer's
    process; everything else runs in the engine's own process.
    """
    moduleDir = _Path(__file__).resolve().parents[1]
    for candidate in (moduleDir, moduleDir.parent):
        if (candidate / "ExtremeAugLogic" / "__init__.py").is_file():
            if str(candidate) not in _sys.path:
                _sys.path.append(str(candidate))
            return


_putEngineOnPath()
