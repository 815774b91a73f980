"""The comparison behind the method's claim, as plain functions (no Ray).

Methods (same data, splits, classifier and label budgets):

- ``frozen_final``: frozen backbone, last layer globally pooled (transfer-learned features)
- ``frozen_tap``: frozen backbone, the CAE's tap, average+max pooled
- ``cae``: the paper's method, CAE codes on the tap's feature maps
- ``cae_pixels``: a CAE on raw pixels, no backbone (does the backbone matter?)
- ``finetune``: supervised fine-tuning of the whole backbone with a linear head on the labels

Each ``run_*`` returns one row per label budget: ``{"method", "seed", "budget", "auc", "acc",
"balanced_acc", "n_labels"}``, with test metrics computed once per fitted model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from medcae.cae import ConvAutoEncoder
from medcae.classifier import sample_budget
from medcae.config import PipelineConfig
from medcae.engine import build_cae, channel_stats, embed_all, shuffled_batches
from medcae.evaluation import fit_and_test
from medcae.finetune import FinetuneConfig, finetune
from medcae.metrics import classification_report
from medcae.trainer import fit_cae

METHODS = ("frozen_final", "frozen_tap", "cae", "cae_pixels", "finetune")
SPLITS = ("train", "val", "test")


def _rows(
    method: str,
    seed: int,
    budgets: Sequence[float],
    feats: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    cfg: PipelineConfig,
    names: Sequence[str],
) -> list[dict]:
    out = []
    for b in budgets:
        clf = replace(cfg.classifier, budget=b, seed=seed)
        ev = fit_and_test(clf, feats, labels, names)
        out.append(_row(method, seed, b, ev.test, ev.selection["n_labels"]))
    return out


def _row(method: str, seed: int, budget: float, test: dict[str, Any], n: float) -> dict:
    return {
        "method": method,
        "seed": seed,
        "budget": budget,
        "auc": test["auc"],
        "acc": test["acc"],
        "balanced_acc": test["balanced_acc"],
        "n_labels": int(n),
        "confusion": test["confusion"],
    }


def _pool(maps: np.ndarray) -> np.ndarray:
    m = np.asarray(maps, np.float32)
    return np.concatenate([m.mean(axis=(2, 3)), m.max(axis=(2, 3))], axis=1)


def train_cae(maps: np.ndarray, cfg: PipelineConfig, seed: int) -> ConvAutoEncoder:
    """Train a CAE on unlabeled maps ``(N, C, h, w)`` with :func:`medcae.trainer.fit_cae`."""
    cae_cfg = replace(cfg.cae, seed=seed)
    model = build_cae(maps.shape[1], cae_cfg, *channel_stats(maps))
    x = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))
    gen = torch.Generator().manual_seed(seed)
    fit_cae(
        model,
        cae_cfg,
        lambda epoch: shuffled_batches(x, cae_cfg.batch_size, gen),
        in_channels=maps.shape[1],
    )
    return model.eval()


def pixels(images: np.ndarray) -> np.ndarray:
    """Raw images as one-channel 'feature maps' ``(N, 1 or 3, H, W)`` in 0..1."""
    x = images.astype(np.float32) / 255.0
    return x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)


def feature_sets(
    method: str, seed: int, data: dict[str, Any], cfg: PipelineConfig
) -> tuple[dict[str, np.ndarray], torch.nn.Module | None]:
    """Per-split feature vectors of one of the four feature methods (and its CAE, if any)."""
    if method == "frozen_final":
        return {s: np.asarray(data[s]["final"]) for s in SPLITS}, None
    if method == "frozen_tap":
        return {s: _pool(data[s]["maps"]) for s in SPLITS}, None
    if method == "cae":
        model = train_cae(np.asarray(data["train"]["maps"]), cfg, seed)
        return {s: embed_all(model, data[s]["maps"]) for s in SPLITS}, model
    if method == "cae_pixels":
        raw = {s: pixels(data[s]["images"]) for s in SPLITS}
        model = train_cae(raw["train"], cfg, seed)
        return {s: embed_all(model, raw[s]) for s in SPLITS}, model
    raise ValueError(f"unknown feature method {method!r}; expected one of {METHODS[:4]}")


def run_feature_method(
    method: str,
    seed: int,
    budgets: Sequence[float],
    data: dict[str, Any],
    cfg: PipelineConfig,
    names: Sequence[str],
) -> tuple[list[dict], torch.nn.Module | None]:
    """Rows of one feature method for one seed (one CAE per seed, reused for all budgets)."""
    feats, model = feature_sets(method, seed, data, cfg)
    labels = {s: np.asarray(data[s]["labels"]) for s in SPLITS}
    return _rows(method, seed, budgets, feats, labels, cfg, names), model


def run_finetune(
    seed: int,
    budget: float,
    data: dict[str, Any],
    cfg: PipelineConfig,
    names: Sequence[str],
    ft: FinetuneConfig | None = None,
) -> dict:
    """Fine-tune the whole backbone + a linear head on the budget's labels; test once.

    The recipe is :func:`medcae.finetune.finetune` (frozen batch norm, warm-up and cosine,
    augmentation, early stopping on validation AUC with the best epoch restored). The row
    carries ``finetune``: what was trained, for how long, at what cost.
    """
    y = np.asarray(data["train"]["labels"])
    idx = sample_budget(y, budget, seed)
    model = finetune(
        cfg.backbone,
        (np.asarray(data["train"]["images"])[idx], y[idx]),
        (np.asarray(data["val"]["images"]), np.asarray(data["val"]["labels"])),
        len(names),
        ft or FinetuneConfig(),
        seed,
    )
    proba = model.predict_proba(np.asarray(data["test"]["images"]))
    report = classification_report(np.asarray(data["test"]["labels"]), proba, names)
    return _row("finetune", seed, budget, report, len(idx)) | {"finetune": model.summary()}


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per (method, budget)."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    out = []
    for (method, budget), rs in groups.items():
        row = {"method": method, "budget": budget, "seeds": len(rs), "n_labels": rs[0]["n_labels"]}
        for m in ("auc", "acc", "balanced_acc"):
            vals = np.array([r[m] for r in rs], float)
            row[m], row[m + "_std"] = float(vals.mean()), float(vals.std())
        out.append(row)
    return out


# Published MedMNIST v2 test results (Yang et al., Scientific Data 2023), fully supervised with
# every training label; quoted from ../shared/data/README.md, not re-run here.
QUOTED = {
    "pneumoniamnist": {
        "ResNet-18 (28)": (0.944, 0.854),
        "ResNet-18 (224)": (0.956, 0.864),
        "ResNet-50 (28)": (0.948, 0.854),
        "ResNet-50 (224)": (0.962, 0.884),
        "auto-sklearn": (0.942, 0.855),
        "AutoKeras": (0.947, 0.878),
        "Google AutoML Vision": (0.991, 0.946),
    }
}


@torch.no_grad()
def reconstruction_examples(
    model: torch.nn.Module, maps: np.ndarray, n: int = 4
) -> dict[str, np.ndarray]:
    """Channel means of ``n`` feature maps and of their CAE reconstructions (de-standardised).

    Returns:
        ``{"maps": (n, h, w), "recon": (n, h, w)}``.
    """
    x = torch.from_numpy(np.asarray(maps[:n], np.float32))
    recon, _ = model(x)
    recon = recon * model.input_std + model.input_mean
    return {"maps": x.mean(1).numpy(), "recon": recon.mean(1).numpy()}
