"""Hyperparameter search: Ray Tune + Optuna (TPE) + ASHA. Same as ``medcae tune``.

Runs from a checkout (``python ray_jobs/tune.py --help``) or on a cluster
(``ray job submit --working-dir . -- python ray_jobs/tune.py ...``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from medcae.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
