"""``python -m resfuse.bench``: see ``resfuse.bench.cli``."""
import sys

from .cli import main

sys.exit(main())
