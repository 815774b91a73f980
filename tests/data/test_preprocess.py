"""One preprocessing: every image is resized once, by the same function, for every caller."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import png_bytes

from medcae.data.preprocess import prepare_batch, prepare_image, to_model_input


@pytest.mark.parametrize(
    "shape, dtype",
    [
        ((30, 50), np.uint8),
        ((64, 64, 3), np.uint8),
        ((17, 9, 1), np.uint8),
        ((40, 40, 4), np.uint8),
        ((33, 21), np.uint16),
        ((12, 12), np.float32),
    ],
)
def test_prepare_gives_three_uint8_channels_at_the_resolution(shape, dtype, rng):
    image = (rng.random(shape) * 200).astype(dtype)
    out = prepare_image(image, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert prepare_image(out, 32) is out  # idempotent: the second call changes nothing


def test_gray_is_repeated_after_resizing(rng):
    gray = rng.integers(0, 256, (40, 24), dtype=np.uint8)
    out = prepare_image(gray, 16)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_batch_of_mixed_sizes_equals_one_by_one(rng):
    images = [rng.integers(0, 256, s, dtype=np.uint8) for s in ((10, 20), (64, 64, 3), (7, 7))]
    batch = prepare_batch(images, 24)
    for i, im in enumerate(images):
        np.testing.assert_array_equal(batch[i], prepare_image(im, 24))
    assert prepare_batch(batch, 24) is batch


def test_model_input_refuses_unprepared_images(rng):
    with pytest.raises(ValueError, match="prepare_batch"):
        to_model_input(rng.integers(0, 256, (2, 8, 8), dtype=np.uint8), (0.5,) * 3, (0.2,) * 3)
    x = to_model_input(
        prepare_batch(rng.integers(0, 256, (2, 8, 8), dtype=np.uint8), 8), (0.5,) * 3, (0.2,) * 3
    )
    assert tuple(x.shape) == (2, 3, 8, 8)


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((300, 260), np.uint8), ((300, 260, 3), np.uint8), ((1024, 768), np.uint16)],
)
def test_big_array_and_its_png_are_prepared_alike(shape, dtype):
    """A big array shrinks by the same integer block mean as its decoded PNG (reduce_to), so
    the Predictor gives the same answer for both forms."""
    from medcae.data import decode_image

    rng = np.random.default_rng(0)
    arr = rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype)
    decoded = decode_image(png_bytes(arr), reduce_to=112)
    k = min(shape[:2]) // 112
    assert decoded.shape[:2] == (shape[0] // k, shape[1] // k)
    a, b = prepare_image(arr, 112), prepare_image(decoded, 112)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
