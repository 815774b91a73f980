"""Representations by name, and the one-standard-error rule that picks one on validation."""

from __future__ import annotations

import numpy as np
import pytest

from medcae.config import ClassifierConfig, ConfigError
from medcae.model.representations import REPRESENTATIONS, choose, get_representation, tap_pool


def _proba(y: np.ndarray, signal: float, rng: np.random.Generator) -> np.ndarray:
    score = signal * y + rng.normal(0, 1, len(y))
    p1 = 1 / (1 + np.exp(-score))
    return np.stack([1 - p1, p1], axis=1)


def test_a_simpler_candidate_within_one_standard_error_is_kept():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)  # a small validation split
    base = _proba(y, 2.0, rng)
    close = np.clip(base + rng.normal(0, 0.02, base.shape), 1e-6, None)
    close /= close.sum(1, keepdims=True)
    c = choose(y, {"frozen_final": base, "cae": close}, 2)
    gap = max(c.val_auc.values()) - c.val_auc["frozen_final"]
    assert c.name == "frozen_final" and gap <= c.se["frozen_final"], c
    assert "within one standard error" in c.reason or "best validation AUC" in c.reason


def test_a_clearly_better_candidate_wins_and_says_why():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    c = choose(y, {"frozen_final": _proba(y, 0.5, rng), "cae_concat": _proba(y, 4.0, rng)}, 2)
    assert c.name == "cae_concat"
    assert c.val_auc["cae_concat"] - c.val_auc["frozen_final"] > c.se["frozen_final"]
    assert c.reason.startswith("cae_concat: the best validation AUC")
    assert set(c.to_dict()) == {"name", "reason", "val_auc", "se"}


def test_features_and_names():
    arrays = {
        "codes": np.ones((3, 4, 2, 2)),
        "tap": tap_pool(np.arange(3 * 5 * 2 * 2, dtype=float).reshape(3, 5, 2, 2)),
        "final": np.zeros((3, 7)),
    }
    assert arrays["tap"].shape == (3, 10)
    assert get_representation("cae_concat").features(arrays).shape == (3, 16 + 10)
    assert get_representation("frozen_final").features(arrays).shape == (3, 7)
    assert list(REPRESENTATIONS) == [
        "frozen_final",
        "frozen_tap",
        "cae",
        "cae_concat",
        "cae_ensemble",
    ]
    with pytest.raises(KeyError, match="expected one of auto"):
        get_representation("nope")
    with pytest.raises(KeyError, match="needs"):
        get_representation("cae").features({"tap": arrays["tap"]})
    with pytest.raises(ConfigError, match="representation must be one of"):
        ClassifierConfig(representation="pixels")


def test_fit_representations_auto_and_fixed(demo_bundle):
    """On real codes of the demo bundle: auto fits every candidate and picks one, a fixed name fits
    it and the frozen baseline."""
    from medcae.evaluation.protocol import fit_representations

    pred, arrays, labels = _demo_arrays(demo_bundle)
    names = pred.label_names
    fitted, choice = fit_representations(ClassifierConfig(C_grid=(0.1, 1.0)), arrays, labels, names)
    assert set(fitted) == set(REPRESENTATIONS) and choice.name in fitted
    fitted, choice = fit_representations(
        ClassifierConfig(C_grid=(1.0,), representation="frozen_tap"), arrays, labels, names
    )
    assert set(fitted) == {"frozen_tap", "frozen_final"} and choice.name == "frozen_tap"


def test_the_default_is_kept_unless_clearly_beaten():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 150)
    good = _proba(y, 2.0, rng)
    near = np.clip(good + rng.normal(0, 0.02, good.shape), 1e-6, None)
    near /= near.sum(1, keepdims=True)
    # the default a hair below the best on validation: kept, and the reason says so
    c = choose(y, {"cae": good, "cae_ensemble": near}, 2, prior="cae_ensemble")
    assert c.name == "cae_ensemble" and c.reason.startswith("cae_ensemble: the default")
    # the default far below a frozen baseline: the baseline is taken, and the reason says why
    c = choose(
        y, {"frozen_final": good, "cae_ensemble": _proba(y, 0.3, rng)}, 2, prior="cae_ensemble"
    )
    assert c.name == "frozen_final"
    assert "more than max(1 SE, 0.01)" in c.reason and "cae_ensemble" in c.reason
    gap = c.val_auc["frozen_final"] - c.val_auc["cae_ensemble"]
    assert gap > max(c.se["cae_ensemble"], 0.01)


@pytest.mark.parametrize("gap, kept", [(0.005, True), (0.009, True), (0.02, False), (0.05, False)])
def test_a_small_gap_on_validation_never_moves_the_default(gap, kept):
    """Near-identical candidates have a tiny paired SE; the minimum gain still holds them."""
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], 300)
    score = y * 1.5 + rng.normal(0, 1, len(y))
    other = score.copy()
    # move the other candidate's scores until its validation AUC is higher by about `gap`
    from medcae.metrics.classification import auc_score

    def proba(s):
        p = 1 / (1 + np.exp(-s))
        return np.stack([1 - p, p], axis=1)

    base = auc_score(y, proba(score), 2)
    for w in np.linspace(0, 3, 301):
        other = score + w * (y - 0.5) * rng.random(len(y))
        if auc_score(y, proba(other), 2) - base >= gap:
            break
    c = choose(y, {"cae": proba(other), "cae_ensemble": proba(score)}, 2, prior="cae_ensemble")
    assert (c.name == "cae_ensemble") == kept, c.reason


def test_an_ensemble_is_one_linear_head_on_its_parts(demo_bundle):
    """fit_ensemble on real demo features: its head reads codes + tap, and its validation AUC
    is that head's on the concatenation."""
    from medcae.evaluation.protocol import fit_ensemble
    from medcae.metrics.classification import auc_score

    pred, arrays, labels = _demo_arrays(demo_bundle)
    rep = get_representation("cae_ensemble")
    ev = fit_ensemble(ClassifierConfig(C_grid=(0.1, 1.0)), rep, arrays, labels, pred.label_names)
    x_val = rep.features(arrays["val"])
    v = arrays["val"]
    assert ev.head.coef.shape[1] == x_val.shape[1] == v["codes"].shape[1] + v["tap"].shape[1]
    k = len(pred.label_names)
    assert ev.selection["val_auc"] == pytest.approx(
        auc_score(labels["val"], ev.head.predict_proba(x_val), k)
    )
    assert len(ev.selection["member_C"]) == 2 and ev.test["auc"] > 0.5


def _demo_arrays(demo_bundle):
    """The demo bundle's test images as every representation's arrays, split in half: the
    first half trains, the second validates and tests."""
    import torch

    from medcae.inference.predictor import Predictor

    pred = Predictor.from_bundle(demo_bundle.path, runtime="torch")
    images, y = demo_bundle.test_images, demo_bundle.test_labels
    out = pred.backbone(images)
    x = torch.from_numpy(out["maps"]).float()
    arr = {"codes": pred.cae.embed(x).numpy(), "tap": tap_pool(out["maps"]), "final": out["final"]}
    half = len(y) // 2
    arrays = {
        "train": {k: v[:half] for k, v in arr.items()},
        "val": {k: v[half:] for k, v in arr.items()},
        "test": {k: v[half:] for k, v in arr.items()},
    }
    return pred, arrays, {"train": y[:half], "val": y[half:], "test": y[half:]}


def test_config_names_every_registered_representation():
    from medcae.config import REPRESENTATION_CHOICES
    from medcae.model.representations import CHOICES

    assert REPRESENTATION_CHOICES == CHOICES
