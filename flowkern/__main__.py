"""``python -m flowkern``: the command line (see flowkern.cli)."""

import sys

from flowkern.cli import main

sys.exit(main())
