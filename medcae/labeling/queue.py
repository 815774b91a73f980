"""The labeling queue's core: a pool's predictions, ranked by a ``suggest`` strategy around the
labels already given, handed out under leases (:mod:`medcae.labeling.store`).

Ray-free: a server predicts its pool once per model version (:func:`predict_pool`), then ranks
it again after each label (:func:`rank`), cheaply, and leases the next images
(:func:`next_images`). Out-of-distribution images are never queued.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medcae.labeling.pool import LabelPool
from medcae.labeling.store import LEASE_S, LabelStore
from medcae.labeling.strategies import Pool, hybrid_choice, suggest


@dataclass(frozen=True)
class PoolPredictions:
    """One model version's view of a pool, row ``i`` for ``ids[i]``.

    Attributes:
        ids: Pool ids.
        proba: ``(N, K)`` probabilities (for findings, each finding's).
        vectors: ``(N, D)`` the head's input vectors (``typiclust`` clusters them).
        in_distribution: ``(N,)`` the bundle's out-of-distribution check passed.
        labels: ``(N,)`` the predicted labels.
    """

    ids: list[str]
    proba: np.ndarray
    vectors: np.ndarray
    in_distribution: np.ndarray
    labels: list[str]


def predict_pool(predictor: object, pool: LabelPool, batch_size: int = 64) -> PoolPredictions:
    """Every image of ``pool`` through ``predictor`` (a
    :class:`medcae.inference.predictor.Predictor`), ``batch_size`` at a time."""
    proba, vectors, ood, labels = [], [], [], []
    for start in range(0, len(pool), batch_size):
        ids = pool.ids[start : start + batch_size]
        out = predictor.predict_arrays([pool.image_bytes(i) for i in ids])  # type: ignore[attr-defined]
        preds = predictor.predictions(out)  # type: ignore[attr-defined]
        proba.append(out["proba"])
        vectors.append(out["features"])
        ood += [p.in_distribution for p in preds]
        labels += [p.label for p in preds]
    return PoolPredictions(
        list(pool.ids),
        np.concatenate(proba) if proba else np.zeros((0, 0)),
        np.concatenate(vectors) if vectors else np.zeros((0, 0)),
        np.asarray(ood, bool),
        labels,
    )


def label_counts(
    labels: Mapping[str, str], names: Sequence[str], multilabel: bool = False
) -> np.ndarray:
    """Labels given per class (for findings, per finding present), from ``{id: label}``."""
    counts = np.zeros(len(names), np.int64)
    index = {n: i for i, n in enumerate(names)}
    for label in labels.values():
        for part in label.split("|") if multilabel else [label]:
            if part in index:
                counts[index[part]] += 1
    return counts


def rank(
    preds: PoolPredictions,
    labeled: Mapping[str, str],
    names: Sequence[str],
    strategy: str = "hybrid",
    seed: int = 0,
    thresholds: np.ndarray | None = None,
    k: int | None = None,
    cluster_sample: int | None = None,
) -> list[str]:
    """The queueable images, best first: not labeled, in distribution, ranked by
    ``strategy`` (:mod:`medcae.labeling.strategies`) around the labels given so far; the
    first ``k`` (default all: ``typiclust`` then clusters as many as it can, slowly).
    With ``cluster_sample``, ``typiclust`` (and ``hybrid`` while it is ``typiclust``) ranks a
    seeded sample of that many unlabeled images (with every labeled one, for coverage): its
    k-means then costs the same at any pool size.

    Args:
        preds: The pool's predictions.
        labeled: Current labels by pool id (:meth:`medcae.labeling.store.LabelStore.current`).
        names: The model's classes (or findings).
        strategy: A ``suggest`` strategy.
        seed: Seeds the strategy.
        thresholds: A multi-label model's thresholds, one per finding.
    """
    if not preds.ids:
        return []
    is_labeled = np.isin(preds.ids, list(labeled))
    counts = label_counts(labeled, names, thresholds is not None)
    idx = np.arange(len(preds.ids))
    clusters = strategy == "typiclust" or (
        strategy == "hybrid" and hybrid_choice(counts) == "typiclust"
    )
    if clusters and cluster_sample and (~is_labeled).sum() > cluster_sample:
        rng = np.random.default_rng(seed)
        rest = rng.choice(np.flatnonzero(~is_labeled), cluster_sample, replace=False)
        idx = np.sort(np.concatenate([np.flatnonzero(is_labeled), rest]))
    state = Pool(
        proba=preds.proba[idx],
        vectors=preds.vectors[idx],
        in_distribution=preds.in_distribution[idx],
        labeled=is_labeled[idx],
        class_counts=counts,
        thresholds=thresholds,
    )
    found = suggest(state, min(k or len(idx), len(idx)), strategy, seed)
    return [preds.ids[idx[i]] for i in found.ranking.indices]


def next_images(
    store: LabelStore,
    model: str,
    preds: PoolPredictions,
    names: Sequence[str],
    k: int,
    annotator: str,
    strategy: str = "hybrid",
    lease_s: float = LEASE_S,
    thresholds: np.ndarray | None = None,
) -> list[str]:
    """The next ``k`` images for ``annotator``: their own unexpired leases first, then
    :func:`rank` around the store's current labels (only as deep as the leases of others and
    ``k`` need), through :meth:`LabelStore.lease` (never an image leased to another)."""
    labeled = {i: lab.label for i, lab in store.current(model).items()}
    held = store.leases(model)
    mine = [i for i, who in held.items() if who == annotator and i not in labeled]
    others = sum(1 for who in held.values() if who != annotator)
    order = rank(preds, labeled, names, strategy, thresholds=thresholds, k=k + others + 50)
    got = store.lease(model, mine + [i for i in order if i not in mine], k, annotator, lease_s)
    if len(got) < k and len(order) < len(preds.ids):  # many skipped: rank the whole pool
        order = rank(preds, labeled, names, strategy, thresholds=thresholds)
        got = store.lease(model, mine + [i for i in order if i not in mine], k, annotator, lease_s)
    return got
