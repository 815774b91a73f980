"""The labeling loop's retraining job. Same as ``medcae retrain``; the server submits it
through the Ray Jobs API (``POST /v1/models/{name}/train``).

Runs from a checkout (``python ray_jobs/retrain.py --help``) or on a cluster
(``ray job submit --working-dir . -- python ray_jobs/retrain.py ...``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from medcae.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["retrain", *sys.argv[1:]]))
