"""``python -m reflora.tools``: the ``reflora`` console script."""

import sys

from reflora.tools.cli import main

sys.exit(main())
