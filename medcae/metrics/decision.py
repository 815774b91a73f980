"""What a decision is worth: sensitivity, specificity, PPV, NPV at an operating point with
Wilson intervals, and the AUC with DeLong's interval and paired test.

Wilson score intervals (Wilson, 1927) for proportions; DeLong, DeLong and Clarke-Pearson (1988)
for the AUC's variance, computed with midranks as Sun and Xu (2014) do; a bootstrap (as every
card's) for balanced accuracy, which is not a proportion.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: Two-sided 95%.
Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion; ``(nan, nan)`` when ``n == 0``."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def _proportion(successes: int, n: int) -> dict[str, Any]:
    low, high = wilson_interval(successes, n)
    return {
        "value": successes / n if n else float("nan"),
        "ci": [low, high],
        "k": int(successes),
        "n": int(n),
    }


def _midrank(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, method="average")


def delong(y: np.ndarray, scores: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of several scores of the same images and DeLong's covariance matrix of them.

    Args:
        y: ``(N,)`` 0/1 labels (1 = positive).
        scores: ``k`` arrays ``(N,)``; higher means more likely positive.

    Returns:
        ``(auc (k,), cov (k, k))``.

    Raises:
        ValueError: Fewer than one positive or one negative.
    """
    y = np.asarray(y).astype(bool)
    m, n = int(y.sum()), int((~y).sum())
    if m < 1 or n < 1:
        raise ValueError(f"DeLong needs positives and negatives, got {m} and {n}")
    s = np.asarray(scores, np.float64).reshape(len(scores), -1)
    aucs, v10, v01 = [], [], []
    for row in s:
        x, z = row[y], row[~y]
        tz = _midrank(np.concatenate([x, z]))
        tx, ty = _midrank(x), _midrank(z)
        aucs.append((tz[:m].sum() - m * (m + 1) / 2) / (m * n))
        v10.append((tz[:m] - tx) / n)
        v01.append(1.0 - (tz[m:] - ty) / m)
    a10, a01 = np.atleast_2d(np.cov(v10)), np.atleast_2d(np.cov(v01))
    cov = (a10 if m > 1 else 0 * a10) / m + (a01 if n > 1 else 0 * a01) / n
    return np.asarray(aucs), cov


def delong_interval(y: np.ndarray, score: np.ndarray, z: float = Z95) -> dict[str, Any]:
    """AUC with DeLong's standard error and a 95% interval (clipped to [0, 1])."""
    auc, cov = delong(y, [score])
    se = float(np.sqrt(max(cov[0, 0], 0.0)))
    a = float(auc[0])
    return {"value": a, "se": se, "ci": [max(0.0, a - z * se), min(1.0, a + z * se)]}


def delong_test(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> dict[str, Any]:
    """DeLong's paired test of two AUCs on the same images (two-sided).

    Returns:
        ``{"auc_a", "auc_b", "difference", "se", "z", "p"}``; ``z`` and ``p`` are nan when the
        two scores rank the images identically (no variance of the difference).
    """
    from scipy.stats import norm

    auc, cov = delong(y, [score_a, score_b])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = float(auc[0] - auc[1])
    if var <= 1e-15:
        zval = pval = float("nan")
    else:
        zval = diff / np.sqrt(var)
        pval = float(2 * norm.sf(abs(zval)))
    return {
        "auc_a": float(auc[0]),
        "auc_b": float(auc[1]),
        "difference": diff,
        "se": float(np.sqrt(max(var, 0.0))),
        "z": float(zval),
        "p": float(pval),
    }


def binary_decision_report(y: np.ndarray, positive: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """Sensitivity, specificity, PPV, NPV and accuracy of 0/1 decisions, each with its Wilson
    interval and counts, and the confusion counts.

    Args:
        y: ``(N,)`` 0/1 truth.
        positive: ``(N,)`` the positive probability (for the AUC's DeLong interval).
        pred: ``(N,)`` 0/1 decisions.
    """
    y, pred = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    tp, fn = int((y & pred).sum()), int((y & ~pred).sum())
    tn, fp = int((~y & ~pred).sum()), int((~y & pred).sum())
    out: dict[str, Any] = {
        "sensitivity": _proportion(tp, tp + fn),
        "specificity": _proportion(tn, tn + fp),
        "ppv": _proportion(tp, tp + fp),
        "npv": _proportion(tn, tn + fn),
        "accuracy": _proportion(tp + tn, len(y)),
        "counts": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
    }
    sens, spec = out["sensitivity"]["value"], out["specificity"]["value"]
    out["balanced_accuracy"] = {"value": float(np.nanmean([sens, spec]))}
    if tp + fn and tn + fp:
        out["auc"] = delong_interval(y, np.asarray(positive, np.float64))
    return out


def decision_report(
    y: np.ndarray,
    proba: np.ndarray,
    pred: np.ndarray,
    label_names: Sequence[str],
    positive: int | None = 1,
) -> dict[str, Any]:
    """The decisions' worth on one split, JSON-ready.

    For two classes (``positive`` given): :func:`binary_decision_report` of the positive
    class, plus the balanced accuracy's bootstrap interval. For several classes: the same per
    class, one against the rest, and the overall accuracy with its Wilson interval.

    Args:
        y: ``(N,)`` class ids.
        proba: ``(N, K)`` probabilities.
        pred: ``(N,)`` decided class ids.
        label_names: K class names.
        positive: The positive class of a two-class problem.
    """
    from medcae.metrics.intervals import bootstrap_ci

    y, pred, proba = np.asarray(y), np.asarray(pred), np.asarray(proba, np.float64)
    k = len(label_names)
    intervals = {
        "proportions": "Wilson score, 95%",
        "balanced_accuracy": "percentile bootstrap, 95%",
        "auc": "DeLong, 95%",
    }
    if k == 2 and positive is not None:
        out = binary_decision_report(y == positive, proba[:, positive], pred == positive)
        out["positive"] = label_names[positive]
    else:
        out = {
            "per_class": {
                name: binary_decision_report(y == c, proba[:, c], pred == c)
                for c, name in enumerate(label_names)
            },
            "accuracy": _proportion(int((pred == y).sum()), len(y)),
        }
        recalls = [(pred[y == c] == c).mean() for c in range(k) if (y == c).any()]
        out["balanced_accuracy"] = {"value": float(np.mean(recalls))}

    def balanced(yy: np.ndarray, rows: np.ndarray) -> float:
        pp = pred[rows[:, 0].astype(np.int64)]
        return float(np.mean([(pp[yy == c] == c).mean() for c in np.unique(yy)]))

    index = np.arange(len(y), dtype=np.float64)[:, None]
    out["balanced_accuracy"]["ci"] = list(bootstrap_ci(y, index, balanced))
    out["intervals"] = intervals
    return out
