"""`python -m flywheel ...` (what torchrun launches) is the same as the `flywheel` console script."""

import sys

from flywheel.cli import main

if __name__ == "__main__":  # not when a spawned worker (a reward-model ensemble's member) imports the main module
    sys.exit(main())
