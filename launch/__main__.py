"""``python -m launch``: see :mod:`launch.commands`."""

import sys

from launch.commands import main

sys.exit(main())
