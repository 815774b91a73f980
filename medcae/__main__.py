"""``python -m medcae``: the same command as ``medcae``."""

import sys

from medcae.cli.main import main

sys.exit(main())
