"""The evidence run: every method x seed as Ray tasks over the cached features."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np
import ray

from medcae.config import PipelineConfig
from medcae.data import Dataset
from medcae.evaluation.comparison import (
    SHARED_CAE,
    reconstruction_examples,
    run_feature_methods,
    run_finetune,
)
from medcae.model.finetune import FinetuneConfig

log = logging.getLogger(__name__)

PIXEL_CAE_CHANNELS = (32, 16)


@ray.remote(num_cpus=1)
def _feature_task(
    methods: list[str], seed: int, budgets: list, data: dict, cfg: dict, names: list[str]
) -> tuple[list[dict], dict | None]:
    config = PipelineConfig.from_dict(cfg)
    if methods == ["cae_pixels"]:  # raw pixels have many positions: stride 2 and a slimmer CAE
        config = replace(
            config, cae=replace(config.cae, downsample=True, channels=PIXEL_CAE_CHANNELS)
        )
    rows, models = run_feature_methods(methods, seed, budgets, data, config, names)
    examples = None
    model = next((models[m] for m in SHARED_CAE if models.get(m) is not None), None)
    if seed == 0 and model is not None:
        examples = reconstruction_examples(model, data["test"]["maps"]) | {
            "images": np.asarray(data["test"]["images"][:4])
        }
    return rows, examples


def task_groups(methods: list[str]) -> list[list[str]]:
    """Feature methods as tasks: those on the seed's tap CAE together (one CAE), others alone."""
    shared = [m for m in methods if m in SHARED_CAE]
    alone = [[m] for m in methods if m not in SHARED_CAE and m != "finetune"]
    return ([shared] if shared else []) + alone


@ray.remote(num_cpus=1)
def _finetune_task(
    seed: int, budget: float, data: dict, cfg: dict, names: list[str], ft: FinetuneConfig
) -> dict:
    return run_finetune(seed, budget, data, PipelineConfig.from_dict(cfg), names, ft)


def run_evaluation(
    ds: Dataset,
    feats: dict[str, dict[str, np.ndarray]],
    cfg: PipelineConfig,
    methods: list[str],
    budgets: list[float],
    seeds: list[int],
    finetune: FinetuneConfig,
) -> tuple[list[dict], dict[str, Any] | None]:
    """Run all (method, seed) tasks concurrently on Ray; returns per-seed rows and examples."""
    data = {
        s: {
            "maps": np.asarray(feats[s]["maps"]),
            "final": np.asarray(feats[s]["final"]),
            "labels": np.asarray(feats[s]["labels"]),
            "images": ds.splits[s].images,
        }
        for s in ("train", "val", "test")
    } | {"multilabel": ds.multilabel}
    ref = ray.put(data)
    cfg_d, names = cfg.to_dict(), list(ds.label_names)
    pending = {
        _feature_task.remote(g, s, budgets, ref, cfg_d, names): ("+".join(g), s)
        for g in task_groups(methods)
        for s in seeds
    }
    if "finetune" in methods:
        pending |= {
            _finetune_task.remote(s, b, ref, cfg_d, names, finetune): (
                "finetune",
                s,
                b,
            )
            for s in seeds
            for b in budgets
        }
    rows, examples, start, total = [], None, time.perf_counter(), len(pending)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        what = pending.pop(done[0])
        out = ray.get(done[0])
        if isinstance(out, tuple):
            rows += out[0]
            examples = out[1] or examples
        else:
            rows.append(out)
        secs = time.perf_counter() - start
        finished = total - len(pending)
        log.info(
            "evaluate: %s done (%d/%d tasks, %.0fs, ETA %.0fs)",
            what,
            finished,
            total,
            secs,
            secs / finished * len(pending),
        )
    return rows, examples
