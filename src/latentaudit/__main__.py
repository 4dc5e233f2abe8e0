"""``python -m latentaudit``: the same command line as ``latentaudit``."""

import sys

from latentaudit.cli import main

sys.exit(main())
