"""Search reports: trials table (CSV), optimisation-history and importance plots (PNG)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def write_trials_csv(rows: list[dict[str, Any]], path: Path) -> Path:
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
