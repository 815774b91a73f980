"""Which images to label next: rank an unlabeled pool with a model bundle.

Same as ``medcae suggest --bundle ...``.

Runs from a checkout (``python ray_jobs/suggest.py --help``) or on a cluster
(``ray job submit --working-dir . -- python ray_jobs/suggest.py ...``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from medcae.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["suggest", *sys.argv[1:]]))
