"""The fine-tuning reference on real data: test AUC, epochs and cost per label budget.

Runs :func:`medcae.model.finetune.finetune` (the recipe ``medcae evaluate`` uses for its
``finetune`` method) on PneumoniaMNIST's official splits, one seed per call, and prints one line
per budget: labels, test AUC and accuracy, best and run epochs, steps, images seen, seconds.

    MEDCAE_DATA_DIR=../shared/data python bench/finetune.py --budgets 1.0,0.01,20 [--seed 0]
        [--resolution 112] [--epochs 12]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main() -> None:
    from medcae.cli.args import budgets
    from medcae.config import BackboneConfig
    from medcae.data import load_dataset
    from medcae.metrics.classification import classification_report
    from medcae.model.classifier import sample_budget
    from medcae.model.finetune import FinetuneConfig, finetune

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="pneumoniamnist")
    p.add_argument("--budgets", type=budgets, default=[1.0, 0.01, 20])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=112)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    ds = load_dataset(a.data)
    tr, va, te = (ds.splits[s] for s in ("train", "val", "test"))
    bb = BackboneConfig(name="efficientnet_lite0", resolution=a.resolution)
    cfg = FinetuneConfig(epochs=a.epochs)
    print(
        f"{ds.name}: train {len(tr.labels)}, val {len(va.labels)}, test {len(te.labels)}; "
        f"{a.resolution} px, up to {a.epochs} epochs, seed {a.seed}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    print(
        f"{'budget':>8} {'labels':>6} {'AUC':>6} {'ACC':>6} {'best/run':>8} {'steps':>6} "
        f"{'images':>7} {'s':>6}",
        flush=True,
    )
    for b in a.budgets:
        idx = sample_budget(tr.labels, b, a.seed)
        start = time.perf_counter()
        model = finetune(
            bb,
            (tr.images[idx], tr.labels[idx]),
            (va.images, va.labels),
            len(ds.label_names),
            cfg,
            a.seed,
        )
        rep = classification_report(te.labels, model.predict_proba(te.images), ds.label_names)
        secs = time.perf_counter() - start
        print(
            f"{b:>8g} {len(idx):>6} {rep['auc']:>6.4f} {rep['acc']:>6.4f} "
            f"{model.best_epoch:>3}/{len(model.history):<4} {model.steps:>6} "
            f"{model.images_seen:>7} {secs:>6.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
