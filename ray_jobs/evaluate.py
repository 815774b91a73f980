"""Evidence: the paper's method against transfer-learned features, a pixel CAE and fine-tuning.

    python ray_jobs/evaluate.py --data pneumoniamnist --out docs/results

Same data, splits, classifier and label budgets for every method, several seeds; methods run as
Ray tasks. Writes report.md (table + conclusions data), results.csv and PNG plots to --out.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install


def _budgets(text: str) -> list[float | int]:
    return [float(t) if "." in t else int(t) for t in text.split(",") if t]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--data", default="demo")
    p.add_argument("--data-dir", default=None)
    p.add_argument(
        "--budgets",
        type=_budgets,
        default=[0.01, 0.1, 1.0, 20],
        help="fractions (with a dot) and counts per class",
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", default="frozen_final,frozen_tap,cae,cae_pixels,finetune")
    p.add_argument("--epochs", type=int, default=15, help="CAE epochs")
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--finetune-resolution", type=int, default=64)
    p.add_argument("--out", default="runs/evaluate")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--address", default=None)
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--smoke-test", action="store_true", help="tiny subset, one seed: seconds")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = parse_args(argv)
    from medcae.errors import run_cli

    return run_cli(lambda: _run(args, " ".join(["python", "ray_jobs/evaluate.py", *sys.argv[1:]])))


def _run(a: argparse.Namespace, command: str) -> int:
    import csv
    from dataclasses import replace

    import numpy as np
    import ray

    from medcae.cache import FeatureCache
    from medcae.config import PipelineConfig
    from medcae.data import load_dataset
    from medcae.distributed.evaluate import run_evaluation
    from medcae.distributed.pipeline import (
        cached_features,
        resolved_backbone,
        smoke_config,
        subsample,
    )
    from medcae.distributed.runtime import init_ray
    from medcae.evidence import METHODS, QUOTED, aggregate
    from medcae.report import (
        evidence_table,
        plot_auc_vs_budget,
        plot_confusion,
        plot_reconstructions,
    )

    methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; expected some of {', '.join(METHODS)}")
    ds = load_dataset(a.data, a.data_dir)
    cfg = PipelineConfig(data=a.data)
    cfg = replace(cfg, cae=replace(cfg.cae, epochs=a.epochs))
    seeds, budgets, ft_epochs = list(range(a.seeds)), a.budgets, a.finetune_epochs
    if a.smoke_test:
        ds = subsample(ds, {"train": 96, "val": 48, "test": 48})
        cfg, seeds, budgets, ft_epochs = smoke_config(cfg), [0], [0.1, 1.0, 5], 1
    cfg = resolved_backbone(cfg)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    init_ray(a.address, a.num_cpus)
    feats, _ = cached_features(ds.splits, ds.fingerprint(), cfg, FeatureCache(a.cache_dir))
    rows, examples = run_evaluation(
        ds,
        feats,
        cfg,
        methods,
        budgets,
        seeds,
        ft_epochs,
        a.finetune_resolution if not a.smoke_test else 32,
    )
    ray.shutdown()
    wall = time.perf_counter() - start
    agg = aggregate(rows)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(
            f, fieldnames=[k for k in rows[0] if k != "confusion"], extrasaction="ignore"
        )
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
    plot_confusion(
        conf,
        ds.label_names,
        f"{full['method']}, {full['budget']:g} labels, seed 0",
        out / "confusion_best.png",
    )
    if examples is not None:
        plot_reconstructions(examples, out / "reconstructions.png")
        np.savez(out / "reconstructions.npz", **examples)
    table = evidence_table(agg, QUOTED.get(a.data, {}))
    machine = f"{platform.node()} ({platform.machine()}, {__import__('os').cpu_count()} cores)"
    report = (
        f"# medcae evidence: {ds.name}\n\nCommand: `{command}`  \nMachine: {machine}  \n"
        f"Wall time: {wall / 60:.1f} min  \nBackbone: {cfg.backbone.name} "
        f"{'+'.join(cfg.backbone.taps)} at {cfg.backbone.resolution}px; CAE "
        f"{cfg.cae.channels}->{cfg.cae.latent_channels}, {cfg.cae.epochs} epochs; "
        f"classifier {cfg.classifier.kind} (C on validation AUC); fine-tuning "
        f"{ft_epochs} epochs of the whole backbone + linear head.\n\n{table}\n\n"
        "![AUC vs budget](auc_vs_budget.png) ![confusion](confusion_best.png) "
        "![reconstructions](reconstructions.png)\n"
    )
    (out / "report.md").write_text(report)
    print(table)
    print(f"\nwall time {wall / 60:.1f} min; report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
