"""``python -m resfuse.bench``: see ``resfuse.bench.cli``; ``--ddp`` (under torchrun): see ``resfuse.bench.ddp``."""
import sys

if sys.argv[1:2] == ["--ddp"]:
    from .ddp import main

    sys.exit(main(sys.argv[2:]))

from .cli import main  # noqa: E402 - the DDP mode above imports nothing of the single-process command

sys.exit(main())
