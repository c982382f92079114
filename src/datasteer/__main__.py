"""``python -m datasteer`` (and ``torchrun -m datasteer train ...``)."""

import sys

from datasteer.cli import main

sys.exit(main())
