"""`python -m flywheel.world --out DIR [--seed N] ...` writes the toy world's datasets (flywheel.world.generate)."""

import sys

from flywheel.world.generate import main

sys.exit(main())
