"""The fine-tuning reference: frozen batch norm, enough steps, best epoch restored."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medcae.config import BackboneConfig
from medcae.metrics.classification import auc_score
from medcae.model.finetune import FinetuneConfig, augment, finetune


@pytest.fixture(scope="module")
def demo(demo_npz):
    from medcae.data import load_dataset

    return load_dataset(str(demo_npz))


def _subset(ds, split, per_class, seed=0):
    s = ds.splits[split]
    rng = np.random.default_rng(seed)
    idx = np.concatenate(
        [rng.choice(np.flatnonzero(s.labels == k), per_class, replace=False) for k in range(3)]
    )
    return s.images[idx], s.labels[idx]


def test_small_budget_trains_enough_steps_keeps_bn_stats_and_restores_the_best_epoch(demo):
    bb = BackboneConfig(name="efficientnet_lite0", resolution=32)
    cfg = FinetuneConfig(epochs=3, min_steps=12, batch_size=8, patience=3)
    train, val = _subset(demo, "train", 4), _subset(demo, "val", 10)
    model = finetune(bb, train, val, 3, cfg, seed=0)
    assert model.steps >= cfg.min_steps  # 12 labels would give 2 steps an epoch otherwise
    assert model.images_seen == model.steps * cfg.batch_size
    assert len(model.history) == 3 and 1 <= model.best_epoch <= 3
    best = max(h["val_auc"] for h in model.history)
    assert auc_score(val[1], model.predict_proba(val[0]), 3) == pytest.approx(best, abs=1e-6)
    # frozen batch norm: the running statistics are still ImageNet's
    from medcae.model.backbones import build_backbone

    fresh = build_backbone(bb.name, None, 32, bb.weights).net
    bns = [
        (a, b)
        for a, b in zip(fresh.modules(), model.backbone.modules())
        if isinstance(a, torch.nn.modules.batchnorm._BatchNorm)
    ]
    assert bns and all(torch.equal(a.running_mean, b.running_mean) for a, b in bns)
    summary = model.summary()
    assert summary["steps"] == model.steps and summary["seconds"] > 0


def test_learns_the_demo_classes(demo):
    bb = BackboneConfig(name="efficientnet_lite0", resolution=32)
    cfg = FinetuneConfig(epochs=4, min_steps=40, batch_size=16)
    model = finetune(bb, _subset(demo, "train", 20), _subset(demo, "val", 20), 3, cfg, seed=1)
    test = demo.splits["test"]
    auc = auc_score(test.labels, model.predict_proba(test.images), 3)
    assert auc > 0.6, (auc, model.history)  # well above chance after 40 steps at 32 px
    assert model.history[-1]["val_auc"] > model.history[0]["val_auc"]


def test_augment_is_seeded_and_keeps_shape():
    x = torch.randn(4, 3, 32, 32)
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    c = augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
