"""`python -m hafs.node ARGS`: the block node server, as `hafs node ARGS`."""

import sys

from .server import main

sys.exit(main())
