"""``python -m musar.cli ...`` (e.g. under ``accelerate launch -m musar.cli train ...``)."""

import sys

from musar.cli import main

sys.exit(main())
