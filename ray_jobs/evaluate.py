"""Evidence: the method against frozen features, a pixel CAE and fine-tuning.

Same as ``medcae evaluate``.

Runs from a checkout (``python ray_jobs/evaluate.py --help``) or on a cluster
(``ray job submit --working-dir . -- python ray_jobs/evaluate.py ...``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from medcae.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
