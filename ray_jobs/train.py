"""Distributed CAE training from a feature store, resumable. Same as ``medcae train``.

Runs from a checkout (``python ray_jobs/train.py --help``) or on a cluster
(``ray job submit --working-dir . -- python ray_jobs/train.py ...``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from medcae.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
