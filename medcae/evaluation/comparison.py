"""The comparison behind the method's claim, as plain functions (no Ray).

Methods (same data, splits, classifier and label budgets):

- ``frozen_final``: frozen backbone, last layer globally pooled (transfer-learned features)
- ``frozen_tap``: frozen backbone, the CAE's tap, average+max pooled
- ``cae``: the paper's method, CAE codes on the tap's feature maps
- ``cae_hier``: the paper's hierarchical form: one CAE per tap (two or more ``--taps``), codes
  concatenated
- ``cae_pixels``: a CAE on raw pixels, no backbone (does the backbone matter?)
- ``cae_concat``: CAE codes concatenated with the tap's average+max pooled features
- ``cae_ensemble``: a head on the CAE codes and one on the pooled tap, logits averaged
- ``cae_spread``: semi-supervised: label spreading on a k-NN graph of the CAE codes of every
  training image (the unlabeled ones included), k and the clamping chosen on validation AUC
- ``auto``: what ``medcae run`` does by default: ``frozen_final``, ``frozen_tap``, ``cae``
  and ``cae_concat`` fitted, one picked on validation by the one-standard-error rule
  (:mod:`medcae.model.representations`), its test metrics reported (and which one it was)
- ``finetune``: supervised fine-tuning of the whole backbone with a linear head on the labels

Each ``run_*`` returns one row per label budget: ``{"method", "seed", "budget", "auc", "acc",
"balanced_acc", "n_labels"}``, with test metrics computed once per fitted model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from medcae.config import PipelineConfig
from medcae.evaluation.protocol import fit_and_test
from medcae.metrics.classification import classification_report
from medcae.model.cae import ConvAutoEncoder
from medcae.model.classifier import sample_budget
from medcae.model.epoch import build_cae, channel_stats, embed_all, shuffled_batches
from medcae.model.finetune import FinetuneConfig, finetune
from medcae.model.representations import tap_pool
from medcae.model.trainer import fit_cae

METHODS = (
    "frozen_final",
    "frozen_tap",
    "cae",
    "cae_hier",
    "cae_pixels",
    "cae_concat",
    "cae_ensemble",
    "cae_spread",
    "auto",
    "finetune",
)
FEATURE_METHODS = METHODS[:-1]
SPLITS = ("train", "val", "test")


def _rows(
    method: str,
    seed: int,
    budgets: Sequence[float],
    feats: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    cfg: PipelineConfig,
    names: Sequence[str],
    multilabel: bool = False,
) -> list[dict]:
    out = []
    for b in budgets:
        clf = replace(cfg.classifier, budget=b, seed=seed)
        ev = fit_and_test(clf, feats, labels, names, multilabel)
        out.append(_row(method, seed, b, ev.test, ev.selection["n_labels"], ev.test_proba))
    return out


def _row(
    method: str,
    seed: int,
    budget: float,
    test: dict[str, Any],
    n: float,
    proba: np.ndarray | None = None,
) -> dict:
    """One method's result at one budget and seed; ``test_proba`` (a list, left out of
    ``results.csv``) feeds the paired DeLong tests (:func:`paired_delong`)."""
    extra = {} if proba is None else {"test_proba": np.asarray(proba, np.float64).tolist()}
    return extra | {
        "method": method,
        "seed": seed,
        "budget": budget,
        "auc": test["auc"],
        "acc": test["acc"],
        "balanced_acc": test["balanced_acc"],
        "n_labels": int(n),
        "confusion": test.get("confusion"),  # findings have one per finding, not one
    }


def train_cae_on_arrays(
    maps: np.ndarray, cfg: PipelineConfig, seed: int, val_maps: np.ndarray | None = None
) -> ConvAutoEncoder:
    """Train a CAE on unlabeled maps ``(N, C, h, w)`` with :func:`medcae.model.trainer.fit_cae`.

    With ``val_maps`` ``(M, C, h, w)``, ``cfg.cae.patience`` stops it early on their
    reconstruction loss and keeps the best epoch, as ``medcae run`` does.
    """
    cae_cfg = replace(cfg.cae, seed=seed)
    model = build_cae(maps.shape[1], cae_cfg, *channel_stats(maps))
    x = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))
    gen = torch.Generator().manual_seed(seed)
    val = None
    if val_maps is not None:
        v = torch.from_numpy(np.ascontiguousarray(val_maps, dtype=np.float32))
        val = lambda: [{"maps": v[i : i + 256]} for i in range(0, len(v), 256)]  # noqa: E731
    fit_cae(
        model,
        cae_cfg,
        lambda epoch: shuffled_batches(x, cae_cfg.batch_size, gen),
        in_channels=maps.shape[1],
        val_batches=val,
    )
    return model.eval()


def hierarchical(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with one CAE per tap (``cae.groups`` from the backbone's taps).

    Raises:
        ValueError: The backbone has fewer than two taps.
    """
    from medcae.model.backbones import tap_channels

    taps = tuple(cfg.backbone.taps)
    if len(taps) < 2:
        raise ValueError(
            f"cae_hier trains one CAE per tap and needs two or more --taps (e.g. "
            f"--taps stage4,stage5), got {list(taps)}"
        )
    groups = tap_channels(cfg.backbone.name, taps, cfg.backbone.resolution)
    return replace(cfg, cae=replace(cfg.cae, groups=groups))


def pixels(images: np.ndarray) -> np.ndarray:
    """Raw images as one-channel 'feature maps' ``(N, 1 or 3, H, W)`` in 0..1."""
    x = images.astype(np.float32) / 255.0
    return x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)


#: Methods with no multi-label form (label spreading and fine-tuning take one class per image).
SINGLE_LABEL_ONLY = ("cae_spread", "finetune")

#: Methods built on the one tap CAE of a seed: an evaluation trains it once for all of them.
SHARED_CAE = ("cae", "cae_concat", "cae_ensemble", "cae_spread", "auto")


def _fit_tap_cae(data: dict[str, Any], cfg: PipelineConfig, seed: int) -> ConvAutoEncoder:
    return train_cae_on_arrays(
        np.asarray(data["train"]["maps"]), cfg, seed, np.asarray(data["val"]["maps"])
    )


def feature_sets(
    method: str,
    seed: int,
    data: dict[str, Any],
    cfg: PipelineConfig,
    model: torch.nn.Module | None = None,
) -> tuple[dict[str, Any], torch.nn.Module | None]:
    """Per-split feature vectors of one feature method (and its CAE, if any).

    Args:
        model: For the :data:`SHARED_CAE` methods, the seed's tap CAE if already trained.
    """
    if method == "frozen_final":
        return {s: np.asarray(data[s]["final"]) for s in SPLITS}, None
    if method == "frozen_tap":
        return {s: tap_pool(data[s]["maps"]) for s in SPLITS}, None
    if method == "cae_hier":
        model = train_cae_on_arrays(
            np.asarray(data["train"]["maps"]),
            hierarchical(cfg),
            seed,
            np.asarray(data["val"]["maps"]),
        )
        return {s: embed_all(model, data[s]["maps"]) for s in SPLITS}, model
    if method == "cae_pixels":
        raw = {s: pixels(data[s]["images"]) for s in SPLITS}
        model = train_cae_on_arrays(raw["train"], cfg, seed, raw["val"])
        return {s: embed_all(model, raw[s]) for s in SPLITS}, model
    if method not in SHARED_CAE:
        raise ValueError(f"unknown feature method {method!r}; expected one of {FEATURE_METHODS}")
    model = model if model is not None else _fit_tap_cae(data, cfg, seed)
    codes = {s: embed_all(model, data[s]["maps"]) for s in SPLITS}
    if method in ("cae", "cae_spread"):
        return codes, model
    if method == "cae_concat":
        return {
            s: np.concatenate([codes[s], tap_pool(data[s]["maps"])], axis=1) for s in SPLITS
        }, model
    return {
        s: {
            "codes": codes[s],
            "tap": tap_pool(data[s]["maps"]),
            "final": np.asarray(data[s]["final"]),
        }
        for s in SPLITS
    }, model


def run_feature_method(
    method: str,
    seed: int,
    budgets: Sequence[float],
    data: dict[str, Any],
    cfg: PipelineConfig,
    names: Sequence[str],
    model: torch.nn.Module | None = None,
) -> tuple[list[dict], torch.nn.Module | None]:
    """Rows of one feature method for one seed (one CAE per seed, reused for all budgets, and
    ``model``, the seed's tap CAE, reused when given)."""
    ml = bool(data.get("multilabel"))
    if ml and method in SINGLE_LABEL_ONLY:
        raise ValueError(f"{method} has no multi-label form; leave it out for findings")
    feats, model = feature_sets(method, seed, data, cfg, model)
    labels = {s: np.asarray(data[s]["labels"]) for s in SPLITS}
    if method == "cae_spread":
        return [spread_row(feats, labels, b, seed, names) for b in budgets], model
    if method == "auto":
        return [auto_row(feats, labels, b, seed, cfg, names, ml) for b in budgets], model
    if method == "cae_ensemble":
        return [ensemble_row(feats, labels, b, seed, cfg, names, ml) for b in budgets], model
    return _rows(method, seed, budgets, feats, labels, cfg, names, ml), model


def run_feature_methods(
    methods: Sequence[str],
    seed: int,
    budgets: Sequence[float],
    data: dict[str, Any],
    cfg: PipelineConfig,
    names: Sequence[str],
) -> tuple[list[dict], dict[str, torch.nn.Module | None]]:
    """Rows of several feature methods for one seed, the :data:`SHARED_CAE` ones on one CAE.

    Returns:
        The rows, and each method's CAE (``None`` for the frozen ones).
    """
    rows, models, shared = [], {}, None
    for m in methods:
        r, model = run_feature_method(m, seed, budgets, data, cfg, names, shared)
        if m in SHARED_CAE:
            shared = model
        rows += r
        models[m] = model
    return rows, models


def auto_row(
    arrays: dict[str, dict[str, np.ndarray]],
    labels: dict[str, np.ndarray],
    budget: float,
    seed: int,
    cfg: PipelineConfig,
    names: Sequence[str],
    multilabel: bool = False,
) -> dict:
    """The default's row: the representation ``auto`` picks on validation
    (:func:`medcae.model.representations.choose`), tested once; ``chosen`` names it, ``val_auc`` and
    ``val_se`` hold every candidate's validation AUC and standard error (JSON)."""
    from medcae.evaluation.protocol import fit_representations

    clf = replace(cfg.classifier, budget=budget, seed=seed, representation="auto")
    fitted, choice = fit_representations(clf, arrays, labels, names, multilabel)
    ev = fitted[choice.name]
    return _row("auto", seed, budget, ev.test, ev.selection["n_labels"], ev.test_proba) | {
        "chosen": choice.name,
        "val_auc": json.dumps({k: round(v, 5) for k, v in choice.val_auc.items()}),
        "val_se": json.dumps({k: round(v, 5) for k, v in choice.se.items()}),
    }


def ensemble_row(
    arrays: dict[str, dict[str, np.ndarray]],
    labels: dict[str, np.ndarray],
    budget: float,
    seed: int,
    cfg: PipelineConfig,
    names: Sequence[str],
    multilabel: bool = False,
) -> dict:
    """The ``cae_ensemble`` representation's row
    (:func:`medcae.evaluation.protocol.fit_ensemble`)."""
    from medcae.evaluation.protocol import fit_ensemble
    from medcae.model.representations import get_representation

    clf = replace(cfg.classifier, budget=budget, seed=seed)
    ev = fit_ensemble(clf, get_representation("cae_ensemble"), arrays, labels, names, multilabel)
    return _row("cae_ensemble", seed, budget, ev.test, ev.selection["n_labels"], ev.test_proba)


SPREAD_GRID = {"n_neighbors": (7, 15, 30), "alpha": (0.2, 0.5, 0.8)}


def spread_row(
    feats: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    budget: float,
    seed: int,
    names: Sequence[str],
) -> dict:
    """Label spreading over every training image's codes (only the budget's labels known).

    Codes are standardised and reduced to at most 64 principal components (fitted on the
    training codes only); test images are classified transductively with the same graph
    rebuilt on train + test, and validation picks ``n_neighbors`` and ``alpha`` once.
    """
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler
    from sklearn.semi_supervised import LabelSpreading

    from medcae.metrics.classification import auc_score

    y = labels["train"]
    idx = sample_budget(y, budget, seed)
    scaler = StandardScaler().fit(feats["train"])
    dims = min(64, feats["train"].shape[1], len(y) - 1)
    pca = PCA(dims, random_state=seed).fit(scaler.transform(feats["train"]))
    z = {s: pca.transform(scaler.transform(feats[s])) for s in SPLITS}
    known = np.full(len(y), -1)
    known[idx] = y[idx]
    k = len(names)

    def proba(params: dict, split: str) -> np.ndarray:
        x = np.concatenate([z["train"], z[split]])
        t = np.concatenate([known, np.full(len(z[split]), -1)])
        model = LabelSpreading(kernel="knn", max_iter=100, **params).fit(x, t)
        dist = np.nan_to_num(model.label_distributions_[len(y) :], nan=0.0)
        dist = dist + 1e-9  # a point the graph never reached: uniform
        return dist / dist.sum(axis=1, keepdims=True)

    grid = [
        {"n_neighbors": n, "alpha": a}
        for n in SPREAD_GRID["n_neighbors"]
        for a in SPREAD_GRID["alpha"]
    ]
    best = max(grid, key=lambda g: auc_score(labels["val"], proba(g, "val"), k))
    test = proba(best, "test")
    report = classification_report(labels["test"], test, names)
    return _row("cae_spread", seed, budget, report, len(idx), test)


def run_finetune(
    seed: int,
    budget: float,
    data: dict[str, Any],
    cfg: PipelineConfig,
    names: Sequence[str],
    ft: FinetuneConfig | None = None,
) -> dict:
    """Fine-tune the whole backbone + a linear head on the budget's labels; test once.

    The recipe is :func:`medcae.model.finetune.finetune` (frozen batch norm, warm-up and cosine,
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
    return _row("finetune", seed, budget, report, len(idx), proba) | {"finetune": model.summary()}


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


def paired_delong(
    rows: list[dict], test_labels: np.ndarray, default: str = "auto", multilabel: bool = False
) -> list[dict[str, Any]]:
    """DeLong's paired test of ``default`` against each other method, per budget and seed,
    on the same test images.

    Two classes: one test on the positive class's probability. Several: one per class, that
    class against the rest (``class`` names it). Findings (``multilabel``, bitmask labels):
    one per finding. Methods whose rows kept no test
    probabilities are left out.

    Returns:
        Rows ``{"budget", "seed", "baseline", "class", "auc_default", "auc_baseline",
        "difference", "z", "p"}``.
    """
    from medcae.metrics.decision import delong_test

    y = np.asarray(test_labels)
    by = {(r["method"], r["budget"], r["seed"]): r for r in rows if "test_proba" in r}
    out = []
    for (method, budget, seed), ref in by.items():
        if method != default:
            continue
        p_ref = np.asarray(ref["test_proba"])
        k = p_ref.shape[1]
        for (other, b, s), row in by.items():
            if other == default or b != budget or s != seed:
                continue
            p = np.asarray(row["test_proba"])
            if p.shape != p_ref.shape or len(p) != len(y):
                continue
            for c in [1] if k == 2 and not multilabel else range(k):
                truth = ((y >> c) & 1) == 1 if multilabel else y == c
                if truth.all() or not truth.any():
                    continue
                t = delong_test(truth, p_ref[:, c], p[:, c])
                out.append(
                    {
                        "budget": budget,
                        "seed": seed,
                        "baseline": other,
                        "class": None if k == 2 and not multilabel else int(c),
                        "auc_default": t["auc_a"],
                        "auc_baseline": t["auc_b"],
                        "difference": t["difference"],
                        "z": t["z"],
                        "p": t["p"],
                    }
                )
    return out
