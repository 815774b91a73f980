"""Main job: train a CAE on frozen-backbone feature maps on Ray, fit a classifier, save a bundle.

Runs directly (``python ray_jobs/pipeline.py --data pneumoniamnist``) or on a cluster
(``ray job submit --working-dir . -- python ray_jobs/pipeline.py ...``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from medcae.jobargs import (  # noqa: E402
    add_data_args,
    add_fault_args,
    add_model_args,
    add_ray_args,
    budget,
    config_from_args,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_data_args(p)
    add_model_args(p)
    k = p.add_argument_group("classifier")
    k.add_argument("--classifier", default="logreg", choices=["logreg", "linear_svm"])
    k.add_argument(
        "--budget",
        type=budget,
        default=1.0,
        help="labels used: fraction of each class (0.1) or count per class (20)",
    )
    add_ray_args(p)
    add_fault_args(p)
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="output folder (default runs/<time>)")
    o.add_argument("--cache-dir", default=None, help="feature cache (default ~/.cache/medcae)")
    o.add_argument("--smoke-test", action="store_true", help="tiny subset, tiny model: seconds")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = parse_args(argv)
    from medcae.errors import run_cli

    return run_cli(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    import ray

    from medcae.classifier import sample_budget
    from medcae.data import load_dataset
    from medcae.distributed.pipeline import run_pipeline
    from medcae.distributed.runtime import init_ray

    cfg = config_from_args(args)
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    dataset = load_dataset(cfg.data, args.data_dir)  # bad input fails before Ray starts
    sample_budget(dataset.splits["train"].labels, cfg.classifier.budget, cfg.classifier.seed)
    init_ray(args.address, args.num_cpus)
    res = run_pipeline(cfg, out, args.cache_dir, args.smoke_test, args.data_dir, dataset)
    ray.shutdown()  # flush worker logs before the summary, so it is the last thing printed
    print(
        f"\nTest-set results ({cfg.data}, {len(res.history)} CAE epochs, "
        f"labels: budget {cfg.classifier.budget}):\n"
    )
    print(res.table)
    for path, reason in res.skipped:
        print(f"skipped unreadable image: {path}: {reason}")
    print(
        f"\nfeature cache: {'hit' if all(res.cache_hits.values()) else 'miss'} "
        f"(features {res.timings['features_s']:.1f}s, CAE training {res.timings['train_s']:.1f}s,"
        f" total {res.timings['total_s']:.1f}s)"
    )
    print(f"model bundle: {res.bundle.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
