"""Run ExtremeAug's whole-loop self-test inside Slicer, without the main window.

    Slicer --no-splash --no-main-window --python-script ExtremeAug/Testing/run_selftest.py

Works from the source tree (the module folder is added to sys.path) and from an installed
extension. Exit code: 0 passed, 1 failed, 77 skipped (e.g. torch not installed in
Slicer's Python; CTest's SKIP_RETURN_CODE convention).
"""

import os
import sys
import unittest

EXIT_PASSED, EXIT_FAILED, EXIT_SKIPPED = 0, 1, 77


def main():
    moduleDir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if moduleDir not in sys.path:
        sys.path.insert(0, moduleDir)
    import ExtremeAug

    result = unittest.TextTestRunner(verbosity=2).run(ExtremeAug.ExtremeAugTest("runTest"))
    if not result.wasSuccessful():
        return EXIT_FAILED
    if result.skipped:
        print("ExtremeAug self-test skipped: " + "; ".join(reason for _, reason in result.skipped))
        return EXIT_SKIPPED
    print("ExtremeAug self-test passed")
    return EXIT_PASSED


# Run at top level: Slicer's --python-script does not promise __name__ == "__main__".
code = main()
sys.exit(code)
