"""Multi-label findings on one split: each finding's AUC and decisions, with their macro and
micro averages.

Macro: the mean over findings (each finding counts once, however rare). Micro: every
(image, finding) pair pooled, so common findings weigh more. Labels arrive as bitmasks
(:mod:`medcae.data.findings`) or as an ``(N, F)`` 0/1 matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medcae.data.findings import decode
from medcae.metrics.classification import rank_auc
from medcae.metrics.decision import binary_decision_report


def as_matrix(y: np.ndarray, num_findings: int) -> np.ndarray:
    """``(N, F)`` 0/1 findings from bitmasks ``(N,)`` (or a matrix, returned as is)."""
    y = np.asarray(y)
    return y if y.ndim == 2 else decode(y, num_findings)


def finding_aucs(y: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """Each finding's AUC (nan where a split lacks its positives or negatives)."""
    m = as_matrix(y, proba.shape[1])
    return np.array([_auc(m[:, j], proba[:, j]) for j in range(proba.shape[1])])


def mean_finding_auc(y: np.ndarray, proba: np.ndarray) -> float:
    """The macro AUC: the mean of :func:`finding_aucs` over findings that have one."""
    aucs = finding_aucs(y, proba)
    return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")


def _auc(t: np.ndarray, p: np.ndarray) -> float:
    if t.min() == t.max():
        return float("nan")
    return rank_auc(t.astype(np.int64), np.stack([1 - p, p], axis=1))


def findings_report(
    y: np.ndarray, proba: np.ndarray, pred: np.ndarray, names: Sequence[str]
) -> dict[str, Any]:
    """The test report of a multi-label head, in the keys single-label reports use.

    ``auc`` is the macro AUC, ``acc`` the mean per-finding accuracy, ``balanced_acc`` the mean
    per-finding balanced accuracy; ``per_class`` gives each finding's precision and recall;
    ``decision`` holds :func:`medcae.metrics.decision.binary_decision_report` per finding
    (``per_finding``), their ``macro`` means and the pooled ``micro`` report.

    Args:
        y: ``(N,)`` bitmasks or ``(N, F)`` 0/1 truth.
        proba: ``(N, F)`` each finding's probability.
        pred: ``(N, F)`` 0/1 decisions.
        names: The F finding names.
    """
    m = as_matrix(y, len(names))
    pred = np.asarray(pred)
    per = {n: binary_decision_report(m[:, j], proba[:, j], pred[:, j]) for j, n in enumerate(names)}
    aucs = finding_aucs(m, proba)
    for j, n in enumerate(names):
        per[n]["auc_value"] = float(aucs[j])

    def mean(key: str) -> float:
        vals = [per[n][key]["value"] for n in names]
        return float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")

    micro = binary_decision_report(m.ravel(), proba.ravel(), pred.ravel())
    micro_auc = _auc(m.ravel(), proba.ravel())
    return {
        "auc": mean_finding_auc(m, proba),
        "micro_auc": micro_auc,
        "acc": float((pred == m).mean()),
        "balanced_acc": mean("balanced_accuracy"),
        "per_class": {
            n: {
                "precision": per[n]["ppv"]["value"],
                "recall": per[n]["sensitivity"]["value"],
                "support": int(m[:, j].sum()),
                "auc": float(aucs[j]),
            }
            for j, n in enumerate(names)
        },
        "decision": {
            "per_finding": per,
            "macro": {k: mean(k) for k in ("sensitivity", "specificity", "ppv", "npv")},
            "micro": micro,
            "intervals": {
                "proportions": "Wilson score, 95%",
                "auc": "DeLong, 95%",
                "balanced_accuracy": "none (per finding: the mean of sensitivity and specificity)",
            },
        },
        "task": "multilabel",
    }


def bootstrap_findings_intervals(
    y: np.ndarray, proba: np.ndarray, pred: np.ndarray, n: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Percentile bootstrap intervals (95%) of the macro AUC, the mean per-finding accuracy
    and the mean per-finding balanced accuracy, resampling images; a resample where a metric
    is not finite (a finding without positives) is left out of that metric."""
    m = as_matrix(y, proba.shape[1])
    pred = np.asarray(pred)
    rng = np.random.default_rng(seed)

    def balanced(t: np.ndarray, d: np.ndarray) -> float:
        vals = []
        for j in range(t.shape[1]):
            pos, neg = t[:, j] == 1, t[:, j] == 0
            if pos.any() and neg.any():
                vals.append((d[pos, j].mean() + (1 - d[neg, j]).mean()) / 2)
        return float(np.mean(vals)) if vals else float("nan")

    stats: dict[str, list[float]] = {"auc": [], "acc": [], "balanced_acc": []}
    for _ in range(n):
        i = rng.integers(0, len(m), len(m))
        values = {
            "auc": mean_finding_auc(m[i], proba[i]),
            "acc": float((pred[i] == m[i]).mean()),
            "balanced_acc": balanced(m[i], pred[i]),
        }
        for k, v in values.items():
            if np.isfinite(v):
                stats[k].append(v)
    out: dict[str, Any] = {
        "level": 0.95,
        "method": "percentile bootstrap over images, resamples where a finding lacks positives "
        "left out of the macro AUC",
        "resamples": n,
        "seed": seed,
        "n": int(len(m)),
    }
    for k, v in stats.items():
        out[k] = [float(q) for q in np.quantile(v, [0.025, 0.975])] if v else [float("nan")] * 2
    return out
