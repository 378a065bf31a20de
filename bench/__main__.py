"""``python -m bench``: the step-time benchmark (see :mod:`bench.step_time` for the flags)."""

import sys

from .step_time import main

sys.exit(main())
