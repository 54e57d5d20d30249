"""``python -m flowkern.bench``: the benchmark command (also ``flowkern bench``)."""
import sys

from flowkern.bench.cli import main

sys.exit(main())
