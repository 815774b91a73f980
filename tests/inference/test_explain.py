"""The evidence map: exact contributions that add up to the classifier's decision."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from medcae.inference.explain import _contributions, explain, heatmap_png
from medcae.inference.predictor import Predictor


@pytest.fixture(scope="module")
def predictor(demo_bundle):
    return Predictor.from_bundle(demo_bundle.path, runtime="torch")


def test_contributions_add_up_to_the_decision(predictor, demo_bundle):
    for image in demo_bundle.test_images[:3]:
        exp = explain(predictor, image)
        assert exp.label == exp.prediction.label
        assert exp.contributions.ndim == 2 and exp.contributions.size > 1
        assert exp.contributions.sum() + exp.intercept == pytest.approx(exp.decision, abs=1e-4)
        assert exp.image.shape == (64, 64, 3) and exp.image.dtype == np.uint8


def test_every_class_and_pool_decomposes_exactly(predictor, demo_bundle):
    image = demo_bundle.test_images[0]
    for name in predictor.label_names:
        exp = explain(predictor, image, label=name)
        assert exp.contributions.sum() + exp.intercept == pytest.approx(exp.decision, abs=1e-4)
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 3, 4))
    for pool, dim in (("avg", 5), ("avgmax", 10), ("flatten", 60)):
        w, mean = rng.normal(size=dim), rng.normal(size=dim)
        if pool == "avg":
            x = z.mean(axis=(1, 2))
        elif pool == "avgmax":
            x = np.concatenate([z.mean(axis=(1, 2)), z.max(axis=(1, 2))])
        else:
            x = z.reshape(-1)
        want = ((x - mean) * w).sum()
        assert _contributions(z, w, mean, pool).sum() == pytest.approx(want, abs=1e-9), pool
    with pytest.raises(ValueError, match="unknown class"):
        explain(predictor, image, label="no-such-class")


def test_binary_head_explains_either_class(predictor, demo_bundle):
    """A binary head has one weight row: class 0's map is the negation of class 1's."""
    from medcae.model.classifier import LinearHead

    h = predictor.head
    binary = LinearHead(
        h.kind, h.mean, h.scale, h.coef[:1], h.intercept[:1], h.platt[:1], num_classes=2
    )
    p2 = Predictor(predictor.extractor, predictor.cae, binary, ["a", "b"], predictor.meta)
    image = demo_bundle.test_images[1]
    a, b = explain(p2, image, "a"), explain(p2, image, "b")
    np.testing.assert_allclose(a.contributions, -b.contributions)
    assert a.contributions.sum() + a.intercept == pytest.approx(a.decision, abs=1e-4)


def test_heatmap_is_a_png_over_the_model_view(predictor, demo_bundle):
    exp = explain(predictor, demo_bundle.test_images[2])
    img = Image.open(io.BytesIO(heatmap_png(exp, size=128)))
    assert img.format == "PNG" and img.size == (128, 128)
    flat = replace(exp, contributions=np.zeros_like(exp.contributions))
    base = np.asarray(Image.open(io.BytesIO(heatmap_png(flat, size=128))).convert("RGB"))
    assert np.abs(np.asarray(img.convert("RGB")).astype(int) - base).max() > 20  # drawn


@pytest.mark.parametrize("rep", ["cae_concat", "cae_ensemble", "frozen_tap", "frozen_final"])
def test_other_representations_predict_and_decompose(predictor, demo_bundle, rep):
    """A head on another representation: the Predictor builds its vectors, and the map over
    the tap's locations still adds up to the decision (none for the pooled last layer)."""
    from medcae.config import ClassifierConfig
    from medcae.inference.explain import ExplainUnavailable
    from medcae.model.classifier import fit_classifier

    images, labels = demo_bundle.test_images, demo_bundle.test_labels
    meta = {**predictor.meta, "representation": {"name": rep}}
    other = Predictor(
        predictor.extractor, predictor.cae, predictor.head, predictor.label_names, meta
    )
    x = other.features(other.backbone(images))
    head, _ = fit_classifier(ClassifierConfig(C_grid=(1.0,)), x, labels, x, labels, 3)
    other.head = head
    proba = other.predict_proba(images[:5])
    np.testing.assert_allclose(proba, head.predict_proba(x[:5]), atol=1e-5)
    if rep == "frozen_final":
        with pytest.raises(ExplainUnavailable, match="no map"):
            explain(other, images[0])
        return
    exp = explain(other, images[0])
    assert exp.contributions.sum() + exp.intercept == pytest.approx(exp.decision, abs=1e-4)
    assert exp.pool.startswith(rep)
