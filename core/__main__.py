"""``python -m core``: the ``malaria`` command line (core.cli)."""

import sys

from core.cli import main

sys.exit(main())
