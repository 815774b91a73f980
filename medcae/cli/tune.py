"""``medcae tune``: Ray Tune + Optuna (TPE) + ASHA over the CAE and the classifier
(``ray_jobs/tune.py``).

Writes to ``--out``: trials.csv, best_config.json, history.png, importance.png, bundle/, run.log.
``--resume`` continues an interrupted search (same ``--out``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medcae.cli.args import config_from_args, default_store_root
from medcae.cli.checks import check_budget
from medcae.cli.logs import print_summary, route_ray_output, setup_run_logging
from medcae.cli.models import register_bundle
from medcae.cli.tracking import log_job, tracking_uri, tune_callbacks

TUNER_OPTIONS = (
    "num_samples",
    "max_concurrent",
    "cpus_per_trial",
    "gpus_per_trial",
    "grace_period",
    "reduction_factor",
    "seed",
    "resume",
)


def main(a: argparse.Namespace) -> int:
    from medcae.distributed import tune as mt
    from medcae.distributed.pipeline import list_sources
    from medcae.distributed.runtime import init_ray, shutdown_ray
    from medcae.distributed.store import ExtractOptions
    from medcae.tuning.space import load_space

    space = load_space(a.space)
    if a.smoke_test:
        space = {**space, **mt.SMOKE_SPACE}
    base = config_from_args(a)
    sources = list_sources(base, a.data_dir, a.smoke_test)  # bad input fails before Ray
    for b in [a.budget, *space.get("classifier.budget", {}).get("choice", [])]:
        check_budget(sources[0], b, a.seed)  # counts per class the data cannot give: now
    out = Path(a.out).resolve()
    log_file = setup_run_logging(out)
    init_ray(a.address, a.num_cpus)
    route_ray_output()
    root = a.feature_store or default_store_root()
    stores, secs = mt.prepare_stores(
        sources, space, base, root, ExtractOptions(runtime=base.train.runtime)
    )
    opts = {k: getattr(a, k) for k in TUNER_OPTIONS}
    uri = tracking_uri(a.mlflow)
    experiment = f"medcae-tune-{a.name}"
    try:
        multilabel = sources[0].multilabel
        tuner = mt.make_tuner(
            space, base, stores, opts, out, a.name, tune_callbacks(uri, experiment), multilabel
        )
        summary = mt.finalize(tuner.fit(), space, base, stores, out, sources[0].name, multilabel)
    finally:
        shutdown_ray()  # no process of a local Ray outlives the job
    log_job(  # the search as a whole, next to one MLflow run per trial
        uri,
        experiment,
        "best",
        {"best": summary["best_params"], "space": space, "num_samples": a.num_samples},
        metrics={
            "best_val_auc": summary["best_val_auc"],
            **{f"test.{k}": v for k, v in summary["test"].items() if isinstance(v, int | float)},
        },
        artifacts={"bundle": Path(summary["bundle"]), "report": out / "trials.csv"},
        tags={"medcae.summary": "true"},
    )
    extract = sum(secs.values()) / max(len(secs), 1)
    trial_s = summary["mean_trial_s"]
    lines = [
        f"\nfeature extraction per backbone variant (s): {json.dumps(secs)}",
        f"trials: {summary['trials']}, mean trial {trial_s:.1f}s: {3600 / trial_s:.0f} trials/h "
        f"per slot with the feature store, {3600 / (trial_s + extract):.0f} trials/h if each "
        f"trial recomputed the backbone ({extract:.1f}s per variant, this run)",
        f"best validation AUC {summary['best_val_auc']:.4f}",
        f"best parameters: {json.dumps(summary['best_params'])}",
        f"test (touched once): AUC {summary['test']['auc']:.4f} ACC {summary['test']['acc']:.4f}",
        f"report: {out}/trials.csv, best_config.json, history.png, importance.png",
        f"log: {log_file}",
        f"model bundle: {summary['bundle']}",
    ]
    registered, code = register_bundle(a, Path(summary["bundle"]))
    if registered:
        lines.insert(-1, registered)  # "model bundle:" stays the last line
    print_summary(lines)
    return code
