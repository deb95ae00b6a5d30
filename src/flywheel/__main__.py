"""`python -m flywheel ...` (what torchrun launches) is the same as the `flywheel` console script."""

import sys

from flywheel.cli import main

sys.exit(main())
