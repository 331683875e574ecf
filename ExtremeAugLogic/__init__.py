"""ExtremeAugLogic: the headless annotate-train-correct engine of ExtremeAug.

Pure Python (torch, monai, SimpleITK, numpy); it never imports ``slicer`` so it runs in
Slicer's Python, in any virtual environment, and as the background training process.
Heavy modules are imported by the submodules that need them, not here.
"""

__version__ = "0.1.0"
