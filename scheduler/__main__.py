"""``python -m scheduler``: the same as ``glmtts-sidecar``."""

import sys

from scheduler.cli import main

sys.exit(main())
