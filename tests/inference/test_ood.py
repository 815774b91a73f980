"""Out-of-distribution flag: CAE reconstruction error above the bundle's validation quantile."""

import numpy as np
import pytest

from medcae.inference.predictor import Predictor

PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "camera",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "text",
    "coins",
    "horse",
)


def natural_photos() -> list[np.ndarray]:
    from skimage import data as skdata

    out = []
    for name in PHOTOS:
        im = np.asarray(getattr(skdata, name)())
        out.append((im * 255).astype(np.uint8) if im.dtype == bool else im.astype(np.uint8))
    return out


def test_photos_and_noise_flagged_domain_images_not(demo_bundle):
    pred = Predictor.from_bundle(demo_bundle.path)
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (64, 64), dtype=np.uint8) for _ in range(10)]
    noise += [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(10)]
    rate = {
        name: np.mean([not p.in_distribution for p in pred.predict(images)])
        for name, images in [
            ("photos", natural_photos()),
            ("noise", noise),
            ("held-out test", list(demo_bundle.test_images)),
        ]
    }
    print(f"\nflagged out of distribution: {rate} (threshold {pred.ood_threshold:.3f})")
    assert rate["photos"] >= 0.9
    assert rate["noise"] == 1.0
    assert rate["held-out test"] <= 0.1  # calibrated at the 99th percentile of validation


def test_threshold_comes_from_the_bundle(demo_bundle):
    pred = Predictor.from_bundle(demo_bundle.path)
    assert pred.meta["ood"]["quantile"] == 0.99
    assert 0 < pred.ood_threshold < np.inf
    errors = pred.predict_arrays(demo_bundle.test_images)["error"]
    assert np.median(errors) < pred.ood_threshold
    assert pred.meta["ood"]["threshold"] == pytest.approx(pred.ood_threshold)
