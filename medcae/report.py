"""Search reports: trials table (CSV), optimisation-history and importance plots (PNG)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """All rows as CSV, columns in first-seen order."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return path


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def plot_history(rows: list[dict[str, Any]], metric: str, path: Path) -> Path:
    """Validation metric per trial (in trial order) with the best-so-far line."""
    vals = [r[metric] if _finite(r.get(metric)) else math.nan for r in rows]
    best, run = [], -math.inf
    for v in vals:
        run = max(run, v) if math.isfinite(v) else run
        best.append(run if math.isfinite(run) else math.nan)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(range(1, len(vals) + 1), vals, label=f"trial {metric}", color="tab:blue")
    ax.plot(range(1, len(vals) + 1), best, color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title("Optimisation history")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def importances(
    rows: list[dict[str, Any]], space: dict[str, dict[str, list[Any]]], metric: str
) -> dict[str, float]:
    """fANOVA hyperparameter importances (Optuna) of the finished trials.

    Returns an empty dict when fewer than two trials have a value or nothing varies.
    """
    import optuna

    dists = {k: _distribution(kind, args) for k, d in space.items() for kind, args in d.items()}
    dists = {k: v for k, v in dists.items() if v is not None}
    study = optuna.create_study(direction="maximize")
    for r in rows:
        if _finite(r.get(metric)):
            params = {k: r[k] for k in dists if k in r}
            study.add_trial(
                optuna.trial.create_trial(
                    params=params, distributions={k: dists[k] for k in params}, value=r[metric]
                )
            )
    if len(study.trials) < 2:
        return {}
    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError):
        return {}


def _distribution(kind: str, args: list[Any]) -> Any:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if kind == "choice":
        return CategoricalDistribution(args) if len(args) > 1 else None
    if kind == "int":
        return IntDistribution(int(args[0]), int(args[1]))
    return FloatDistribution(float(args[0]), float(args[1]), log=kind == "loguniform")


def plot_importance(imp: dict[str, float], path: Path) -> Path:
    """Horizontal bar chart of importances (or a note when there are none)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    if imp:
        names = list(imp)[::-1]
        ax.barh(names, [imp[n] for n in names], color="tab:green")
        ax.set_xlabel("importance (fANOVA)")
    else:
        ax.text(0.5, 0.5, "too few finished trials for importances", ha="center")
    ax.set_title("Hyperparameter importance")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


LABELS = {
    "frozen_final": "frozen backbone, final layer",
    "frozen_tap": "frozen backbone, CAE tap",
    "cae": "CAE on tap feature maps (method)",
    "cae_hier": "one CAE per tap, codes concatenated (hierarchical)",
    "cae_pixels": "CAE on raw pixels",
    "cae_concat": "CAE codes + pooled tap",
    "cae_ensemble": "CAE codes head + pooled tap head, averaged",
    "cae_spread": "CAE codes, label spreading (semi-supervised)",
    "auto": "the default (--representation auto)",
    "finetune": "fine-tuned backbone",
}


def _budget_name(b: float) -> str:
    return f"{b:g}/class" if isinstance(b, int) or b > 1 else f"{b:.0%}"


def evidence_table(agg: list[dict[str, Any]], quoted: dict[str, tuple[float, float]]) -> str:
    """Markdown table: method x budget, test AUC / ACC / balanced ACC as mean ± std."""
    lines = [
        "| method | labels | n labels | test AUC | test ACC | balanced ACC | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(agg, key=lambda r: (list(LABELS).index(r["method"]), r["n_labels"])):
        lines.append(
            f"| {LABELS[r['method']]} | {_budget_name(r['budget'])} | {r['n_labels']} | "
            f"{r['auc']:.3f} ± {r['auc_std']:.3f} | {r['acc']:.3f} ± {r['acc_std']:.3f} | "
            f"{r['balanced_acc']:.3f} ± {r['balanced_acc_std']:.3f} | {r['seeds']} |"
        )
    for name, (auc, acc) in quoted.items():
        lines.append(f"| {name} (quoted, not re-run) | 100% | all | {auc:.3f} | {acc:.3f} | | |")
    return "\n".join(lines)


def plot_auc_vs_budget(agg: list[dict[str, Any]], path: Path) -> Path:
    """Test AUC against the number of labels, one line per method (error bars: std)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in LABELS:
        rs = sorted((r for r in agg if r["method"] == method), key=lambda r: r["n_labels"])
        if rs:
            ax.errorbar(
                [r["n_labels"] for r in rs],
                [r["auc"] for r in rs],
                yerr=[r["auc_std"] for r in rs],
                marker="o",
                capsize=3,
                label=LABELS[method],
            )
    ax.set_xscale("log")
    ax.set_xlabel("training labels used (log)")
    ax.set_ylabel("test AUC")
    ax.set_title("Test AUC vs label budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_confusion(confusion: list[list[int]], names: list[str], title: str, path: Path) -> Path:
    """A confusion matrix with counts."""
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(confusion, cmap="Blues")
    for i, row in enumerate(confusion):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_reconstructions(ex: dict[str, Any], path: Path) -> Path:
    """Input images, channel means of their feature maps and of the CAE reconstructions."""
    n = len(ex["images"])
    fig, axes = plt.subplots(3, n, figsize=(2 * n, 6))
    for j in range(n):
        for i, (key, title) in enumerate(
            (
                ("images", "input"),
                ("maps", "feature map mean"),
                ("recon", "CAE reconstruction mean"),
            )
        ):
            ax = axes[i][j] if n > 1 else axes[i]
            lim = (
                {}
                if key == "images"
                else {"vmin": ex["maps"][j].min(), "vmax": ex["maps"][j].max()}
            )
            ax.imshow(ex[key][j], cmap="gray", **lim)  # map and reconstruction share a scale
            ax.set_axis_off()
            if j == 0:
                ax.set_title(title, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


STRATEGY_STYLES = {  # distinct dashes: two strategies that pick alike still show as two lines
    "random": {"color": "tab:gray", "linestyle": "-", "marker": "o"},
    "margin": {"color": "tab:blue", "linestyle": "-", "marker": "s"},
    "typiclust": {"color": "tab:green", "linestyle": "-", "marker": "^"},
    "hybrid": {"color": "tab:red", "linestyle": "--", "marker": "x"},
}


def plot_active(agg: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Test AUC against labels, one line per strategy: the mean with a ±1 std band, the AUC
    of ``random`` at the most labels dashed, half of those labels dotted.

    Args:
        agg: Rows ``{"strategy", "n_labels", "auc", "auc_std"}``
            (:func:`medcae.study.summarize`).
        path: The PNG to write.
        title: Appended to the plot's title.
    """
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for strategy in dict.fromkeys(r["strategy"] for r in agg):
        rs = sorted((r for r in agg if r["strategy"] == strategy), key=lambda r: r["n_labels"])
        x = np.array([r["n_labels"] for r in rs])
        y, sd = np.array([r["auc"] for r in rs]), np.array([r["auc_std"] for r in rs])
        style = STRATEGY_STYLES.get(strategy, {"marker": "o"})
        (line,) = ax.plot(x, y, label=strategy, **style)
        ax.fill_between(x, y - sd, y + sd, color=line.get_color(), alpha=0.12, linewidth=0)
    rand = [r for r in agg if r["strategy"] == "random"]
    if rand:
        top = max(rand, key=lambda r: r["n_labels"])
        ax.axhline(top["auc"], color="black", linestyle=":", linewidth=1)
        ax.annotate(
            f"random at {top['n_labels']} labels",
            (ax.get_xlim()[0], top["auc"]),
            xytext=(4, 3),
            textcoords="offset points",
            fontsize=8,
        )
        ax.axvline(top["n_labels"] / 2, color="black", linestyle=":", linewidth=1)
        ax.annotate(
            f"half: {top['n_labels'] / 2:g} labels",
            (top["n_labels"] / 2, ax.get_ylim()[0]),
            xytext=(4, 4),
            textcoords="offset points",
            fontsize=8,
        )
    ax.set_xlabel("labeled training images")
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title("Which images to label next" + (f": {title}" if title else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
