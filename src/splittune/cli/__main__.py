"""``python -m splittune.cli``."""

import sys

from . import app

sys.exit(app())
