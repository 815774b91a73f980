"""How far probabilities are from frequencies: ECE, Brier score, log-loss, reliability bins.

For two classes (and for each finding of a multi-label model) the probability judged is the
positive one's, ``p(y = 1)``: "0.8" should mean 8 in 10 such images are positive. For several
exclusive classes the ECE judges the top class's probability against the share of top-class
answers that were right (Guo et al., 2017), and the Brier score sums over the classes (Brier's
original form).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Equal-width bins of the expected calibration error and the reliability diagram.
ECE_BINS = 10
_EPS = 1e-15


def judged(y: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The probability each image is judged on and whether the event happened.

    Args:
        y: ``(N,)`` class ids.
        proba: ``(N, K)`` probabilities.

    Returns:
        ``(p, hit)``: for ``K == 2`` the positive class's probability and ``y == 1``; else the
        top class's probability and whether the top class was right.
    """
    y, proba = np.asarray(y), np.asarray(proba, np.float64)
    if proba.shape[1] == 2:
        return proba[:, 1], (y == 1).astype(np.float64)
    return proba.max(axis=1), (proba.argmax(axis=1) == y).astype(np.float64)


def reliability_bins(p: np.ndarray, hit: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """Equal-width bins of ``p`` on [0, 1]: count, mean probability and observed frequency of
    each non-empty bin (the last bin holds 1.0)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=False), 0, bins - 1)
    out = []
    for b in range(bins):
        m = which == b
        if m.any():
            out.append(
                {
                    "low": float(edges[b]),
                    "high": float(edges[b + 1]),
                    "n": int(m.sum()),
                    "mean_p": float(p[m].mean()),
                    "frequency": float(hit[m].mean()),
                }
            )
    return out


def expected_calibration_error(y: np.ndarray, proba: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean gap between mean probability and frequency over
    :func:`reliability_bins` of :func:`judged`'s probability."""
    p, hit = judged(y, proba)
    rows = reliability_bins(p, hit, bins)
    return float(sum(r["n"] * abs(r["mean_p"] - r["frequency"]) for r in rows) / max(len(p), 1))


def brier_score(y: np.ndarray, proba: np.ndarray) -> float:
    """Mean squared error of the probabilities: of ``p(y = 1)`` for two classes, else summed
    over the classes."""
    y, proba = np.asarray(y), np.asarray(proba, np.float64)
    if proba.shape[1] == 2:
        return float(np.mean((proba[:, 1] - (y == 1)) ** 2))
    onehot = np.eye(proba.shape[1])[y]
    return float(np.mean(((proba - onehot) ** 2).sum(axis=1)))


def log_loss(y: np.ndarray, proba: np.ndarray) -> float:
    """Mean negative log probability of the true class (clipped at 1e-15)."""
    y, proba = np.asarray(y), np.asarray(proba, np.float64)
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], _EPS, 1.0))))


def calibration_report(y: np.ndarray, proba: np.ndarray, bins: int = ECE_BINS) -> dict[str, Any]:
    """ECE, Brier score, log-loss and the reliability bins of one split, JSON-ready."""
    p, hit = judged(y, proba)
    return {
        "ece": expected_calibration_error(y, proba, bins),
        "brier": brier_score(y, proba),
        "log_loss": log_loss(y, proba),
        "n": int(len(y)),
        "judged": "p(positive)" if np.asarray(proba).shape[1] == 2 else "top-class probability",
        "bins": reliability_bins(p, hit, bins),
    }
