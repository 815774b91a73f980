"""Confidence intervals of the test metrics: the percentile bootstrap of every card and report."""

from __future__ import annotations

from typing import Any

import numpy as np

from medcae.metrics.classification import Metric, accuracy, balanced_accuracy, rank_auc

#: Bootstrap settings of every card: resamples, seed, and 1 - confidence level.
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
BOOTSTRAP_ALPHA = 0.05


def card_metrics() -> dict[str, Metric]:
    """The test metrics a card gives intervals for, keyed as in the test report (accuracies
    of the argmax: a bundle without an operating point)."""
    return {
        "auc": rank_auc,
        "acc": accuracy,
        "balanced_acc": balanced_accuracy,
    }


def decided_metrics() -> dict[str, Metric]:
    """:func:`card_metrics` of probabilities with the decided class as a last column
    (``np.column_stack([proba, pred])``): the accuracies of the operating point's decisions."""

    def acc(y: np.ndarray, x: np.ndarray) -> float:
        return float((x[:, -1] == y).mean())

    def balanced(y: np.ndarray, x: np.ndarray) -> float:
        return float(np.mean([(x[y == c, -1] == c).mean() for c in np.unique(y)]))

    return {"auc": lambda y, x: rank_auc(y, x[:, :-1]), "acc": acc, "balanced_acc": balanced}


def bootstrap_intervals(
    y_true: np.ndarray,
    proba: np.ndarray,
    n: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    alpha: float = BOOTSTRAP_ALPHA,
    pred: np.ndarray | None = None,
) -> dict[str, Any]:
    """Bootstrap intervals of the card's test metrics, JSON-ready.

    Args:
        y_true: ``(N,)`` test labels.
        proba: ``(N, K)`` test probabilities.
        pred: ``(N,)`` the operating point's decisions, which the accuracies judge; None:
            the argmax.
        n: Resamples.
        seed: Seed (every metric sees the same resamples).
        alpha: One minus the confidence level.

    Returns:
        ``{"level", "method", "resamples", "seed", "n", metric: [low, high], ...}``.
    """
    out: dict[str, Any] = {
        "level": 1 - alpha,
        "method": "percentile bootstrap, plain resampling with replacement, "
        "resamples missing a class redrawn",
        "resamples": n,
        "seed": seed,
        "n": int(len(y_true)),
    }
    x, metrics = proba, card_metrics()
    if pred is not None:
        x, metrics = np.column_stack([proba, pred]), decided_metrics()
    for key, metric in metrics.items():
        out[key] = list(bootstrap_ci(y_true, x, metric, n, seed, alpha))
    return out


def bootstrap_ci(
    y_true: np.ndarray,
    proba: np.ndarray,
    metric: Metric,
    n: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    alpha: float = BOOTSTRAP_ALPHA,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``metric`` over the rows.

    Plain (not stratified) resampling with replacement. A resample that lacks a class present
    in the full sample, or whose metric is not finite, is redrawn, at most ``20 * n`` draws in
    all; the interval comes from the valid resamples (``(nan, nan)`` if none).

    Args:
        y_true: ``(N,)`` labels.
        proba: ``(N, K)`` class probabilities.
        metric: ``metric(y, proba) -> float``.
        n: Valid resamples wanted.
        seed: Seed of the resampling; the same seed gives the same interval.
        alpha: One minus the confidence level (0.05: a 95% interval).

    Returns:
        ``(low, high)``: the ``alpha / 2`` and ``1 - alpha / 2`` quantiles.

    Raises:
        ValueError: If the inputs are empty or their lengths differ, or ``n`` or ``alpha`` is
            out of range.
    """
    y, p = np.asarray(y_true), np.asarray(proba)
    if len(y) == 0 or len(y) != len(p):
        raise ValueError(f"bootstrap_ci needs matching non-empty rows, got {len(y)} and {len(p)}")
    if n < 1 or not 0 < alpha < 1:
        raise ValueError(f"bootstrap_ci needs n >= 1 and 0 < alpha < 1, got n={n}, alpha={alpha}")
    rng = np.random.default_rng(seed)
    classes = len(np.unique(y))
    stats: list[float] = []
    for _ in range(20 * n):
        idx = rng.integers(0, len(y), len(y))
        if len(np.unique(y[idx])) == classes:
            value = metric(y[idx], p[idx])
            if np.isfinite(value):
                stats.append(value)
        if len(stats) == n:
            break
    if not stats:
        return float("nan"), float("nan")
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)
