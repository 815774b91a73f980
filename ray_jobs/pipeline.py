"""Main job: frozen-backbone features, CAE on Ray Train, classifier, bundle. Same as ``medcae run``.

Runs from a checkout (``python ray_jobs/pipeline.py --help``) or on a cluster
(``ray job submit --working-dir . -- python ray_jobs/pipeline.py ...``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from medcae.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
