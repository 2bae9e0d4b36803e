"""``python -m prunelab ...``: the command line (torchrun starts each process of a distributed run so)."""

import sys

from .cli import main

sys.exit(main())
