"""``python -m chimera.simulations``: see :mod:`chimera.simulations.cli`."""

import sys

from .cli import main

sys.exit(main())
