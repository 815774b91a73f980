"""Predictions for a whole archive: one row per image from a model bundle.

Same as ``medcae predict --bundle ...``.

Runs from a checkout (``python ray_jobs/predict.py --help``) or on a cluster
(``ray job submit --working-dir . -- python ray_jobs/predict.py ...``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from medcae.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
