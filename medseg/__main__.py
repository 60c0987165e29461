"""``python -m medseg`` is the ``medseg`` command (torchrun launches it this way)."""

import sys

from medseg.cli import main

sys.exit(main())
