"""Hyperparameter search with Ray Tune + Optuna (TPE) + ASHA over the CAE and the classifier.

The feature store of every (taps, resolution) the space can pick is built once (or reused)
through the same Ray Data stages as the main job; each trial is a function trainable that
reads it, trains a CAE epoch by epoch, fits the classifier on the label budget and reports
the validation AUC after every epoch (ASHA stops bad trials on it). The test split is never
read during the search.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import tune
from ray.tune import Checkpoint
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from medcae.config import PipelineConfig
from medcae.data import Rows
from medcae.data.findings import decode
from medcae.distributed.store import ExtractOptions, FeatureStore, build_store, load_store
from medcae.model.classifier import fit_classifier, fit_findings
from medcae.model.epoch import build_cae, embed_all, errors_all, shuffled_batches
from medcae.model.trainer import TrainerState, fit_cae, load_checkpoint, save_checkpoint
from medcae.tuning.space import apply_params, backbone_variants

log = logging.getLogger(__name__)

METRIC = "val_auc"


def tune_space(space: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    """Ray Tune distributions for a validated space (OptunaSearch converts them)."""
    make = {
        "choice": tune.choice,
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "int": lambda a: tune.randint(a[0], a[1] + 1),
    }
    return {k: make[kind](args) for k, d in space.items() for kind, args in d.items()}


def _start_state() -> dict[str, Any] | None:
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return load_checkpoint(d)


def cae_maps(store: FeatureStore) -> np.ndarray:
    """The CAE's training maps: the labeled training split and the unlabeled pool."""
    parts = [store.arrays(s, ("maps",))["maps"] for s in ("train", "unlabeled")]
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def trial(
    params: dict[str, Any], base: dict, stores: dict[str, str], multilabel: bool = False
) -> None:
    """One Tune trial: :func:`~medcae.model.trainer.fit_cae` on the store's maps; after each epoch
    the classifier is fitted on the budget and scored on validation (ASHA reads it); for
    findings (``multilabel``), a head per finding scored by the mean AUC over findings."""
    torch.set_num_threads(
        max(1, int(tune.get_context().get_trial_resources().required_resources.get("CPU", 1)))
    )
    cfg = apply_params(PipelineConfig.from_dict(base), params)
    store = load_store(stores[_variant(cfg)])
    x = torch.from_numpy(cae_maps(store))
    labeled = {s: store.arrays(s, ("label", "maps")) for s in ("train", "val")}
    model = build_cae(x.shape[1], cfg.cae, torch.tensor(store.mean), torch.tensor(store.std))
    gen = torch.Generator().manual_seed(cfg.cae.seed)

    def on_epoch(state: TrainerState, metrics: dict[str, Any]) -> None:
        codes = {s: embed_all(model, labeled[s]["maps"]) for s in labeled}
        if multilabel:
            f = len(store.label_names)
            y = {s: decode(labeled[s]["label"], f) for s in labeled}
            _, sel = fit_findings(
                cfg.classifier, codes["train"], y["train"], codes["val"], y["val"]
            )
        else:
            _, sel = fit_classifier(
                cfg.classifier,
                codes["train"],
                labeled["train"]["label"],
                codes["val"],
                labeled["val"]["label"],
                len(store.label_names),
            )
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(state.checkpoint(), d)
            tune.report(
                {
                    METRIC: sel["val_auc"],
                    "train_loss": metrics["train_loss"],
                    "epoch": metrics["epoch"],
                },
                checkpoint=Checkpoint.from_directory(d),
            )

    fit_cae(
        model,
        cfg.cae,
        lambda epoch: shuffled_batches(x, cfg.cae.batch_size, gen),
        in_channels=x.shape[1],
        fingerprint=store.key,
        start=_start_state(),
        on_epoch=on_epoch,
    )


def _variant(cfg: PipelineConfig) -> str:
    return f"{'+'.join(cfg.backbone.taps)}@{cfg.backbone.resolution}"


def prepare_stores(
    sources: list[Rows], space: dict, base: PipelineConfig, root: str, extract: ExtractOptions
) -> tuple[dict[str, str], dict[str, float]]:
    """Build (or reuse) the feature store of every backbone variant the space can pick.

    Returns:
        ``({variant: store uri}, {variant: seconds spent})``.
    """
    uris, secs = {}, {}
    for bb in backbone_variants(space, base):
        cfg = replace(base, backbone=bb)
        t = time.perf_counter()
        uris[_variant(cfg)] = build_store(sources, cfg.backbone, root, extract).uri
        secs[_variant(cfg)] = time.perf_counter() - t
    return uris, secs


def make_tuner(
    space: dict,
    base: PipelineConfig,
    stores: dict[str, str],
    opts: dict[str, Any],
    storage: Path,
    name: str,
    callbacks: list[Any] | None = None,
    multilabel: bool = False,
) -> tune.Tuner:
    """A Tuner: OptunaSearch (TPE, seeded) limited to ``max_concurrent``, ASHA on val AUC.

    ``callbacks`` (e.g. MLflow's) see every trial's reports.
    """
    trainable = tune.with_resources(
        tune.with_parameters(trial, base=base.to_dict(), stores=stores, multilabel=multilabel),
        {"cpu": opts["cpus_per_trial"], "gpu": opts["gpus_per_trial"]},
    )
    path = storage / name
    if opts["resume"] and tune.Tuner.can_restore(str(path)):
        log.info("resuming search from %s", path)
        return tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    import optuna

    searcher = OptunaSearch(
        metric=METRIC, mode="max", sampler=optuna.samplers.TPESampler(seed=opts["seed"])
    )
    max_t = max(
        space.get("cae.epochs", {}).get("choice", [base.cae.epochs])
        + space.get("cae.epochs", {}).get("int", [])
    )
    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        metric=METRIC,
        mode="max",
        max_t=max_t,
        grace_period=opts["grace_period"],
        reduction_factor=opts["reduction_factor"],
    )
    return tune.Tuner(
        trainable,
        param_space=tune_space(space),
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, opts["max_concurrent"]),
            scheduler=scheduler,
            num_samples=opts["num_samples"],
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage),
            verbose=1,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=callbacks,
        ),
    )


def best_of(results: tune.ResultGrid) -> tune.Result:
    """The trial with the highest validation AUC at any reported epoch's end (last report)."""
    return results.get_best_result(metric=METRIC, mode="max", scope="last")


def trials_table(results: tune.ResultGrid) -> list[dict[str, Any]]:
    """One row per trial: its parameters, last and best validation AUC, epochs run, status."""
    rows = []
    for r in results:
        m = r.metrics or {}
        hist = r.metrics_dataframe
        best = float(hist[METRIC].max()) if hist is not None and METRIC in hist else float("nan")
        rows.append(
            {
                "trial_id": m.get("trial_id"),
                **{k: v for k, v in r.config.items()},
                METRIC: m.get(METRIC),
                "best_" + METRIC: best,
                "epochs_run": m.get("training_iteration"),
                "time_total_s": m.get("time_total_s"),
                "error": str(r.error)[:200] if r.error else "",
            }
        )
    return rows


def save_json(path: Path, obj: Any) -> None:
    """Write JSON atomically-enough for reports (tmp file + rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


SMOKE_SPACE = {
    "backbone.taps": {"choice": ["stage4"]},
    "backbone.resolution": {"choice": [64]},
    "cae.depth": {"int": [1, 2]},
    "cae.width": {"choice": [16, 32]},
    "cae.latent_channels": {"choice": [4, 8]},
    "cae.epochs": {"choice": [4]},
}


def finalize(
    results: tune.ResultGrid,
    space: dict,
    base: PipelineConfig,
    stores: dict[str, str],
    out: Path,
    data_name: str,
    multilabel: bool = False,
) -> dict[str, Any]:
    """Best trial -> bundle (its checkpoint reused), test split touched once; tables and plots."""
    from medcae.evaluation.export import save_model
    from medcae.evaluation.protocol import fit_and_test
    from medcae.tuning.report import importances, plot_history, plot_importance, write_trials_csv

    rows = trials_table(results)
    write_trials_csv(rows, out / "trials.csv")
    best = best_of(results)
    cfg = apply_params(base, best.config)
    store = load_store(stores[_variant(cfg)])
    with best.checkpoint.as_directory() as d:
        state = load_checkpoint(d)
    model = build_cae(store.shape[0], cfg.cae, torch.tensor(store.mean), torch.tensor(store.std))
    model.load_state_dict(state["model"])
    splits = ("train", "val", "test")
    feats = {s: store.arrays(s, ("label", "maps")) for s in splits}
    codes = {s: embed_all(model, feats[s]["maps"]) for s in splits}
    labels = {s: feats[s]["label"] for s in splits}
    fitted = fit_and_test(cfg.classifier, codes, labels, store.label_names, multilabel)
    bundle = save_model(
        out / "bundle",
        cfg,
        data_name,
        store.label_names,
        model,
        fitted,
        errors_all(model, feats["val"]["maps"]),
        {"search_best_trial": best.config, "feature_store": {"uri": store.uri, "key": store.key}},
        labels=labels,
        unlabeled=store.count("unlabeled"),
        multilabel=multilabel,
    )
    imp = importances(rows, space, METRIC)
    plot_history(rows, METRIC, out / "history.png")
    plot_importance(imp, out / "importance.png")
    times = [r["time_total_s"] for r in rows if r.get("time_total_s")]
    summary = {
        "mean_trial_s": float(np.mean(times)) if times else float("nan"),
        "best_params": best.config,
        "best_config": cfg.to_dict(),
        "best_val_auc": best.metrics.get(METRIC),
        "test": fitted.test,
        "bundle": str(bundle),
        "trials": len(rows),
        "importances": imp,
        "epochs_run": {str(r["trial_id"]): r["epochs_run"] for r in rows},
    }
    save_json(out / "best_config.json", summary)
    return summary
