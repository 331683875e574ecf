"""Entry point for ``python -m ExtremeAugLogic``."""

import sys

from ExtremeAugLogic.cli import main

if __name__ == "__main__":
    sys.exit(main())
