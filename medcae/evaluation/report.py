"""The evaluation report: ``results.csv``, ``report.md`` and its plots (AUC against labels, the
best confusion matrix, CAE reconstructions), written by ``medcae evaluate``."""

from __future__ import annotations

import csv
import os
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:
    from medcae.model.finetune import FinetuneConfig


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


def command_line() -> str:
    """The command as typed: ``python ray_jobs/evaluate.py ...`` or ``medcae evaluate ...``."""
    if sys.argv[0].endswith(".py"):
        return " ".join(["python", *sys.argv])
    return " ".join(["medcae", *sys.argv[1:]])


def finetune_text(rows: list[dict], ft: FinetuneConfig, resolution: int) -> str:
    """What the fine-tuning reference trained, for how long, at what cost, per budget."""

    runs = [r for r in rows if r.get("finetune")]
    head = (
        f"the whole backbone + a linear head at {ft.resolution or resolution} px, "
        f"frozen batch-norm statistics, AdamW (backbone lr {ft.lr:g}, head x{ft.head_lr_mult:g}), "
        f"warm-up + cosine, augmentation, up to {ft.epochs} epochs of at least "
        f"{-(-ft.min_steps // ft.epochs)} steps, early stopping on validation AUC (patience "
        f"{ft.patience}), best epoch restored"
    )
    per_budget = {}
    for r in runs:
        per_budget.setdefault(r["budget"], []).append(r["finetune"])
    mean = lambda fs, k: np.mean([f[k] for f in fs])  # noqa: E731
    parts = [
        f"{b:g}: best epoch {mean(fs, 'best_epoch'):.1f} of {mean(fs, 'epochs_run'):.1f} run, "
        f"{mean(fs, 'steps'):.0f} steps, {mean(fs, 'seconds'):.0f} s per run"
        for b, fs in sorted(per_budget.items())
    ]
    return head + (" (" + "; ".join(parts) + ")" if parts else "") + "."


def finetune_clause(rows: list[dict], ft: FinetuneConfig, resolution: int) -> str:
    """``; fine-tuning ...`` for the report's header when fine-tuning ran, else ``.``."""
    if not any(r.get("finetune") for r in rows):
        return "."
    return f"; fine-tuning {finetune_text(rows, ft, resolution)}"


def write_report(
    out: Path,
    ds: Any,
    cfg: Any,
    rows: list[dict],
    examples: dict | None,
    budgets: list[float | int],
    ft: FinetuneConfig,
    wall: float,
    test_labels: np.ndarray | None = None,
    multilabel: bool = False,
) -> str:
    """Write results.csv, the plots and report.md to ``out``; returns the evidence table.

    With ``test_labels`` (the test split's, in the rows' order) and the default (``auto``)
    among the methods, also ``delong.csv`` and a table of DeLong's paired test of the default
    against each baseline at each budget and seed."""

    from medcae.evaluation.comparison import QUOTED, aggregate, paired_delong

    agg = aggregate(rows)
    with open(out / "results.csv", "w", newline="") as f:
        scalar = dict.fromkeys(  # every row's scalar columns, in first-seen order
            k for r in rows for k, v in r.items() if not isinstance(v, dict | list)
        )
        w = csv.DictWriter(f, fieldnames=list(scalar), extrasaction="ignore", restval="")
        w.writeheader()
        w.writerows(rows)
    plot_auc_vs_budget(agg, out / "auc_vs_budget.png")
    full = max(
        (r for r in agg if r["budget"] == max(budgets, key=lambda b: b if b <= 1 else 0)),
        key=lambda r: r["auc"],
    )
    conf = next(
        r["confusion"]
        for r in rows
        if r["method"] == full["method"] and r["budget"] == full["budget"] and r["seed"] == 0
    )
    if conf is not None:  # findings have no single confusion matrix
        plot_confusion(
            conf,
            ds.label_names,
            f"{full['method']}, {full['budget']:g} labels, seed 0",
            out / "confusion_best.png",
        )
    if examples is not None:
        plot_reconstructions(examples, out / "reconstructions.png")
        np.savez(out / "reconstructions.npz", **examples)
    table = evidence_table(agg, QUOTED.get(cfg.data, {}))
    if multilabel:
        table = (
            f"Findings ({', '.join(ds.label_names)}): test AUC is the mean over findings, ACC and "
            "balanced ACC the means of each finding's at its own threshold; a count budget is "
            "that many positives of each finding and as many images without one.\n\n" + table
        )
    tests = (
        paired_delong(rows, test_labels, multilabel=multilabel) if test_labels is not None else []
    )
    if tests:
        with open(out / "delong.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(tests[0]))
            w.writeheader()
            w.writerows(tests)
        table += "\n\n" + delong_table(tests, ds.label_names)
    machine = f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores)"
    report = (
        f"# medcae evidence: {ds.name}\n\nCommand: `{command_line()}`  \nMachine: {machine}  \n"
        f"Wall time: {wall / 60:.1f} min  \nBackbone: {cfg.backbone.name} "
        f"{'+'.join(cfg.backbone.taps)} at {cfg.backbone.resolution}px; CAE "
        f"{cfg.cae.channels}->{cfg.cae.latent_channels}, {cfg.cae.epochs} epochs; "
        f"classifier {cfg.classifier.kind} (C on validation AUC)"
        f"{finetune_clause(rows, ft, cfg.backbone.resolution)}\n\n{table}\n\n"
        "![AUC vs budget](auc_vs_budget.png) ![confusion](confusion_best.png) "
        "![reconstructions](reconstructions.png)\n"
    )
    (out / "report.md").write_text(report)
    return table


def delong_table(tests: list[dict[str, Any]], names: list[str]) -> str:
    """Markdown: per budget and baseline, the default's AUC minus the baseline's and DeLong's
    two-sided p, one value per seed."""
    groups: dict[tuple, list[dict]] = {}
    for t in tests:
        groups.setdefault((t["budget"], t["baseline"], t["class"]), []).append(t)
    lines = [
        "Paired DeLong tests, the default (`auto`) against each baseline on the same test "
        "images (one value per seed):",
        "",
        "| labels | baseline | class | AUC default - baseline | p |",
        "|---|---|---|---|---|",
    ]
    for (budget, base, cls), ts in sorted(  # noqa: B007
        groups.items(), key=lambda kv: (kv[0][0], kv[0][1], str(kv[0][2]))
    ):
        ts = sorted(ts, key=lambda t: t["seed"])
        diff = ", ".join(f"{t['difference']:+.3f}" for t in ts)
        p = ", ".join(f"{t['p']:.3g}" for t in ts)
        what = "positive" if cls is None else names[cls]
        lines.append(
            f"| {_budget_name(budget)} | {LABELS.get(base, base)} | {what} | {diff} | {p} |"
        )
    return "\n".join(lines)


def reliability_png(calibration: dict[str, Any], title: str = "") -> bytes:
    """The reliability diagram of a bundle's ``calibration`` record as PNG bytes: mean
    probability against observed frequency per bin, before and after calibration, on the val
    and test splits (dot area: images in the bin), with each curve's ECE."""
    import io

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.4), sharey=True)
    for ax, split in zip(axes, ("val", "test")):
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfectly calibrated")
        for when, colour in (("before", "tab:orange"), ("after", "tab:blue")):
            r = (calibration.get(split) or {}).get(when)
            none = calibration.get("method") == "none"
            if not r or not r.get("bins") or (none and when == "after"):
                continue
            bins = r["bins"]
            name = "uncalibrated" if when == "before" else f"calibrated ({calibration['method']})"
            name += " (calibration: none chosen)" if none else ""
            ax.plot(
                [b["mean_p"] for b in bins],
                [b["frequency"] for b in bins],
                marker="o",
                color=colour,
                label=f"{name}: ECE {r['ece']:.3f}",
            )
            ax.scatter(
                [b["mean_p"] for b in bins],
                [b["frequency"] for b in bins],
                s=[8 + 200 * b["n"] / max(r["n"], 1) for b in bins],
                color=colour,
                alpha=0.3,
            )
        judged = ((calibration.get(split) or {}).get("after") or {}).get("judged", "probability")
        ax.set_xlabel(f"mean predicted {judged}")
        ax.set_title(f"{split} split")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8, loc="upper left")
    axes[0].set_ylabel("observed frequency")
    fig.suptitle(title or "Reliability diagram", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
