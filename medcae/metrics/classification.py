"""Classification metrics (AUC, accuracy, balanced accuracy) and a plain-text results table.

The run's table, the evaluation report, the labeling study and the model card read the same
functions; their intervals are in :mod:`medcae.metrics.intervals`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Metric = Callable[[np.ndarray, np.ndarray], float]


def auc_score(y: np.ndarray, proba: np.ndarray, num_classes: int) -> float:
    """ROC AUC: binary on the positive class, else one-vs-rest macro average.

    Args:
        y: ``(N,)`` labels.
        proba: ``(N, K)`` class probabilities.
        num_classes: K.
    """
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return float("nan")
    if num_classes == 2:
        return float(roc_auc_score(y, proba[:, 1]))
    return float(
        roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=list(range(num_classes)))
    )


def classification_report(
    y: np.ndarray,
    proba: np.ndarray,
    label_names: Sequence[str],
    pred: np.ndarray | None = None,
) -> dict[str, object]:
    """ACC, AUC, balanced accuracy, per-class precision/recall of the decisions.

    Args:
        y: ``(N,)`` labels.
        proba: ``(N, K)`` probabilities.
        label_names: K class names.
        pred: ``(N,)`` the decided classes (the operating point's); None: the argmax (0.5 for
            two classes).
    """
    from sklearn.metrics import (
        balanced_accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
    )

    k = len(label_names)
    pred = proba.argmax(axis=1) if pred is None else np.asarray(pred)
    prec, rec, _, support = precision_recall_fscore_support(
        y, pred, labels=list(range(k)), zero_division=0
    )
    return {
        "acc": float((pred == y).mean()),
        "auc": auc_score(y, proba, k),
        "balanced_acc": float(balanced_accuracy_score(y, pred)),
        "per_class": {
            n: {"precision": float(p), "recall": float(r), "support": int(s)}
            for n, p, r, s in zip(label_names, prec, rec, support)
        },
        "confusion": confusion_matrix(y, pred, labels=list(range(k))).tolist(),
    }


def format_results(rows: dict[str, dict[str, Any]], label_names: Sequence[str]) -> str:
    """Render ``{method: report}`` as an aligned text table.

    Two classes: AUC, accuracy and balanced accuracy, then sensitivity and specificity at the
    operating point with their 95% Wilson intervals, PPV, NPV, and the ECE before and after
    calibration (when the reports carry them). Several classes: per-class precision/recall.
    """
    if rows and all(r.get("task") == "multilabel" for r in rows.values()):
        return _format_multilabel(rows)
    binary = all("sensitivity" in r.get("decision", {}) for r in rows.values()) and rows
    calibrated = all("calibration" in r for r in rows.values()) and rows
    head = ["method", "AUC", "ACC", "BalACC"]
    if binary:
        head += ["Sens [95% CI]", "Spec [95% CI]", "PPV", "NPV"]
    else:
        head += [f"P/R {n}" for n in label_names]
    if calibrated:
        head += ["ECE raw>cal"]
    lines = [head]
    for method, r in rows.items():
        line = [method, f"{r['auc']:.3f}", f"{r['acc']:.3f}", f"{r['balanced_acc']:.3f}"]
        if binary:
            d = r["decision"]
            line += [_with_ci(d["sensitivity"]), _with_ci(d["specificity"])]
            line += [f"{d['ppv']['value']:.3f}", f"{d['npv']['value']:.3f}"]
        else:
            pc = r["per_class"]
            line += [f"{pc[n]['precision']:.2f}/{pc[n]['recall']:.2f}" for n in label_names]
        if calibrated:
            c = r["calibration"]
            line += [f"{c['before']['ece']:.3f}>{c['after']['ece']:.3f}"]
        lines.append(line)
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    fmt = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in lines]
    return "\n".join([fmt[0], "-" * len(fmt[0]), *fmt[1:]])


def _table(lines: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    fmt = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in lines]
    return "\n".join([fmt[0], "-" * len(fmt[0]), *fmt[1:]])


def _format_multilabel(rows: dict[str, dict[str, Any]]) -> str:
    head = ["method", "AUC macro", "AUC micro", "ACC", "BalACC", "Sens macro", "Spec macro"]
    head += ["ECE raw>cal"]
    lines = [head]
    for method, r in rows.items():
        macro, c = r["decision"]["macro"], r["calibration"]
        lines.append(
            [method, f"{r['auc']:.3f}", f"{r['micro_auc']:.3f}", f"{r['acc']:.3f}"]
            + [f"{r['balanced_acc']:.3f}", f"{macro['sensitivity']:.3f}"]
            + [f"{macro['specificity']:.3f}", f"{c['before']['ece']:.3f}>{c['after']['ece']:.3f}"]
        )
    return _table(lines)


def format_findings(report: dict[str, Any], names: Sequence[str]) -> str:
    """One row per finding of a multi-label report: positives, AUC with its DeLong interval,
    the threshold, sensitivity and specificity with Wilson intervals, PPV, NPV, and the ECE
    before and after calibration; then the macro and micro rows."""
    per = report["decision"]["per_finding"]
    ops = report.get("operating_point", {})
    cal = report.get("calibration", {}).get("per_finding", {})
    lines = [["finding", "pos", "AUC [95% CI]", "threshold", "Sens [95% CI]", "Spec [95% CI]"]]
    lines[0] += ["PPV", "NPV", "ECE raw>cal"]
    for n in names:
        d, c = per[n], cal.get(n, {})
        auc = d.get("auc")
        t = (ops.get(n) or {}).get("threshold")
        lines.append(
            [n, str(d["sensitivity"]["n"]), _with_ci(auc) if auc else "n/a"]
            + [f"{t:.3f}" if t is not None else "?"]
            + [_with_ci(d["sensitivity"]), _with_ci(d["specificity"])]
            + [f"{d['ppv']['value']:.3f}", f"{d['npv']['value']:.3f}"]
            + [f"{c['before']['ece']:.3f}>{c['after']['ece']:.3f}" if c else "?"]
        )
    macro, micro = report["decision"]["macro"], report["decision"]["micro"]
    lines.append(
        ["macro", "", f"{report['auc']:.3f}", ""]
        + [f"{macro['sensitivity']:.3f}", f"{macro['specificity']:.3f}"]
        + [f"{macro['ppv']:.3f}", f"{macro['npv']:.3f}", ""]
    )
    lines.append(
        ["micro", "", f"{report['micro_auc']:.3f}", ""]
        + [_with_ci(micro["sensitivity"]), _with_ci(micro["specificity"])]
        + [f"{micro['ppv']['value']:.3f}", f"{micro['npv']['value']:.3f}", ""]
    )
    return _table(lines)


def _with_ci(p: dict[str, Any]) -> str:
    low, high = p["ci"]
    return f"{p['value']:.3f} [{low:.2f},{high:.2f}]"


def accuracy(y: np.ndarray, proba: np.ndarray) -> float:
    """Argmax accuracy, as :func:`classification_report` reports ``acc``."""
    return float((proba.argmax(axis=1) == y).mean())


def balanced_accuracy(y: np.ndarray, proba: np.ndarray) -> float:
    """Mean recall over the classes present in ``y`` (scikit-learn's balanced accuracy)."""
    pred = proba.argmax(axis=1)
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))


def rank_auc(y: np.ndarray, proba: np.ndarray) -> float:
    """ROC AUC as :func:`auc_score` defines it, from ranks (fast enough to run
    a thousand times): binary on the positive class, else the one-vs-rest macro average.

    Args:
        y: ``(N,)`` labels.
        proba: ``(N, K)`` class probabilities.

    Returns:
        The AUC, or nan if a class of the one-vs-rest average (or either binary class) is
        missing from ``y``.
    """
    from scipy.stats import rankdata

    k = proba.shape[1]
    scores = []
    for c in [1] if k == 2 else range(k):
        pos = y == c
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if not n_pos or not n_neg:
            return float("nan")
        ranks = rankdata(proba[:, c])  # ties share their mean rank: they count one half
        scores.append((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(scores))
