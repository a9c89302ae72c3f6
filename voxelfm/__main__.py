"""``python -m voxelfm``: the same tool as the ``voxelfm`` console script."""

import sys

from voxelfm.cli import main

sys.exit(main())
