"""``python -m benchmarks.harness ARGS`` (in the repository root): the same as ``groupclip bench ARGS``."""

import sys

from .commands import main

sys.exit(main())
