"""`python -m metapl` (and `torchrun ... -m metapl`): the same entry point as the `metapl` script."""

import sys

from metapl.cli import main

if __name__ == "__main__":  # not when a spawned worker process imports this module
    sys.exit(main())
