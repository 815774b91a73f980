"""The labeling study's report: ``active.csv``, ``active.md`` and the AUC-against-labels plot,
written by ``medcae evaluate --active``."""

from __future__ import annotations

import csv
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from medcae.evaluation.report import command_line

if TYPE_CHECKING:
    from medcae.labeling.study import StudyConfig


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
            (:func:`medcae.labeling.study.summarize`).
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


def write_study(
    out: Path, name: str, rows: list[dict], study: StudyConfig, seeds: int, wall: float
) -> str:
    """Write active.csv, active_auc.png and active.md to ``out``; returns the table and the
    verdict."""
    from medcae.labeling.study import COLUMNS, goal, study_table, summarize

    with open(out / "active.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    agg = summarize(rows)
    plot_active(agg, out / "active_auc.png", f"{name}, {seeds} seed(s)")
    verdict = goal(agg)
    table = study_table(agg) + ("\n\n" + verdict.text() if verdict else "")
    (out / "active.md").write_text(study_text(name, study, seeds, wall, rows, table))
    return table


def study_text(
    name: str, study: StudyConfig, seeds: int, wall: float, rows: list[dict], table: str
) -> str:
    """active.md: the command, the design, the table and the verdict."""
    from medcae.labeling.study import delegation_text

    machine = f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores)"
    delegated = delegation_text(rows)
    return (
        f"# Which images to label next: {name}\n\nCommand: `{command_line()}`  \n"
        f"Machine: {machine}  \nWall time: {wall / 60:.1f} min\n\n"
        f"The training split is the pool and its labels the oracle. Each seed trains its CAE "
        f"once and draws {study.start_per_class} labels per class at random (the same start "
        f"for every strategy); each round then labels the {study.step} images the strategy "
        f"ranks first, up to {study.max_labels} labels. After every round the default head "
        "(`cae_ensemble`: a logistic head on the CAE codes and one on the pooled tap, logits "
        "averaged, each C chosen on validation AUC) is refitted on exactly the labeled images "
        "and scored on the test split, which nothing else sees. `margin` ranks by the current "
        "head's probabilities, `typiclust` clusters its input vectors (codes + tap, "
        "standardized)"
        + (f"; {delegated}" if delegated else "")
        + f".\n\nTest AUC, mean ± std over {seeds} seed(s) (bold: the best of the row):\n\n"
        f"{table}\n\n![test AUC against labels](active_auc.png)\n"
    )
