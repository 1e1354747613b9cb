"""``python -m prunax compare ...``: the ``prunax`` command."""

import sys

from prunax.cli import main

sys.exit(main())
