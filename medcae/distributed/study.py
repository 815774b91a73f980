"""The labeling study on Ray: one task per seed builds the representation (its CAE trained
once), then one task per (strategy, seed) runs the rounds (:mod:`medcae.labeling.study`)."""

from __future__ import annotations

import logging
import time

import numpy as np
import ray

from medcae.config import ClassifierConfig, PipelineConfig
from medcae.evaluation.comparison import feature_sets
from medcae.labeling.study import REPRESENTATION, StudyConfig, run_rounds

log = logging.getLogger(__name__)


@ray.remote(num_cpus=1)
def _arrays_task(seed: int, data: dict, cfg: dict) -> dict:
    """The seed's CAE trained once; ``{split: {"codes", "tap", "final"}}``."""
    arrays, _ = feature_sets(REPRESENTATION, seed, data, PipelineConfig.from_dict(cfg))
    return arrays


@ray.remote(num_cpus=1)
def _rounds_task(
    strategy: str,
    seed: int,
    arrays: dict,
    labels: dict,
    names: list[str],
    study: StudyConfig,
    clf: ClassifierConfig,
) -> list[dict]:
    return run_rounds(strategy, seed, arrays, labels, names, study, clf).rows


def run_study(
    feats: dict[str, dict[str, np.ndarray]],
    cfg: PipelineConfig,
    study: StudyConfig,
    seeds: list[int],
    names: list[str],
) -> list[dict]:
    """Every (strategy, seed) of ``study`` on Ray; returns the rounds' rows.

    Args:
        feats: ``{split: {"maps", "final", "labels"}}`` from the feature store.
        cfg: The resolved pipeline config (CAE and classifier).
        study: The rounds and strategies.
        seeds: Seeds, each with its own CAE and random start.
        names: Class names.
    """
    data = {s: {k: np.asarray(v) for k, v in feats[s].items()} for s in ("train", "val", "test")}
    labels = {s: data[s]["labels"] for s in data}
    ref, cfg_d = ray.put(data), cfg.to_dict()
    arrays = {s: _arrays_task.remote(s, ref, cfg_d) for s in seeds}
    pending = {a: ("representation", s) for s, a in arrays.items()}
    pending |= {
        _rounds_task.remote(st, s, arrays[s], labels, names, study, cfg.classifier): (st, s)
        for st in study.strategies
        for s in seeds
    }
    order = {st: i for i, st in enumerate(study.strategies)}
    rows = _collect(pending)
    return sorted(rows, key=lambda r: (order[r["strategy"]], r["seed"], r["round"]))


def _collect(pending: dict) -> list[dict]:
    """Wait for every task, one log line with an ETA as each finishes; the rounds' rows."""
    rows, start, total = [], time.perf_counter(), len(pending)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        what, seed = pending.pop(done[0])
        out = ray.get(done[0])
        if isinstance(out, list):
            rows += out
        secs, finished = time.perf_counter() - start, total - len(pending)
        log.info(
            "active: %s, seed %d done (%d/%d tasks, %.0fs, ETA %.0fs)",
            what,
            seed,
            finished,
            total,
            secs,
            secs / finished * len(pending),
        )
    return rows
