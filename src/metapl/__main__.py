import sys

from metapl.cli import main

sys.exit(main())
