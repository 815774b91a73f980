"""Hyperparameter search: Ray Tune + Optuna (TPE) + ASHA over the CAE and the classifier.

    python ray_jobs/tune.py --data pneumoniamnist --num-samples 64 --max-concurrent 4
    python ray_jobs/tune.py ... --resume          # continue an interrupted search (same --out)

Writes to --out: trials.csv, best_config.json, history.png, importance.png, bundle/.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--data", default="demo", help="data set (as for ray_jobs/pipeline.py)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--space", default=None, help="YAML overriding the default search space")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=0.0)
    p.add_argument("--grace-period", type=int, default=2, help="ASHA: epochs before stopping")
    p.add_argument("--reduction-factor", type=int, default=2)
    p.add_argument(
        "--budget",
        type=lambda t: float(t) if "." in t else int(t),
        default=1.0,
        help="label budget: fraction (0.1) or count per class (20)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/tune")
    p.add_argument("--name", default="search", help="experiment name under --out")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--resume", action="store_true", help="restore the search at --out/--name")
    p.add_argument("--address", default=None)
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--smoke-test", action="store_true", help="tiny data, tiny space, seconds")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = parse_args(argv)
    from medcae.errors import run_cli

    return run_cli(lambda: _run(args))


def _run(a: argparse.Namespace) -> int:
    import json
    from dataclasses import replace

    import ray

    from medcae.cache import FeatureCache
    from medcae.classifier import sample_budget
    from medcae.config import ClassifierConfig, PipelineConfig
    from medcae.data import load_dataset
    from medcae.distributed import tune as mt
    from medcae.distributed.pipeline import subsample
    from medcae.distributed.runtime import init_ray
    from medcae.search import load_space

    space = load_space(a.space)
    ds = load_dataset(a.data, a.data_dir)
    if a.smoke_test:
        space = {**space, **mt.SMOKE_SPACE}
        ds = subsample(ds, {"train": 96, "val": 48, "test": 48})
    sample_budget(ds.splits["train"].labels, a.budget, a.seed)  # fail before Ray starts
    base = PipelineConfig(data=a.data, classifier=ClassifierConfig(budget=a.budget, seed=a.seed))
    base = replace(base, cae=replace(base.cae, seed=a.seed))
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    init_ray(a.address, a.num_cpus)
    cache = FeatureCache(a.cache_dir)
    keys, secs = mt.prepare_features(ds, space, base, cache)
    opts = {
        k: getattr(a, k)
        for k in (
            "num_samples",
            "max_concurrent",
            "cpus_per_trial",
            "gpus_per_trial",
            "grace_period",
            "reduction_factor",
            "seed",
            "resume",
        )
    }
    results = mt.make_tuner(space, base, cache, keys, opts, out, a.name).fit()
    summary = mt.finalize(results, ds, space, base, cache, keys, out)
    ray.shutdown()
    print(f"\nfeature extraction per backbone variant (s): {json.dumps(secs)}")
    extract = sum(secs.values()) / max(len(secs), 1)
    trial_s = summary["mean_trial_s"]
    print(
        f"trials: {summary['trials']}, mean trial {trial_s:.1f}s: {3600 / trial_s:.0f} trials/h "
        f"per slot with the feature cache, {3600 / (trial_s + extract):.0f} trials/h if each "
        f"trial recomputed the backbone ({extract:.1f}s per variant, this run)"
    )
    print(f"best validation AUC {summary['best_val_auc']:.4f}")
    print(f"best parameters: {json.dumps(summary['best_params'])}")
    print(f"test (touched once): AUC {summary['test']['auc']:.4f} ACC {summary['test']['acc']:.4f}")
    print(f"report: {out}/trials.csv, best_config.json, history.png, importance.png")
    print(f"model bundle: {summary['bundle']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
