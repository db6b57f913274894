"""``python -m segsde.cli``: the ``segsde`` command."""

import sys

from segsde.cli import main

sys.exit(main())
