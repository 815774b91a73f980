"""Image preprocessing shared by the extraction stage, evaluation and serving.

Decoding yields native pixels (an image at least twice the input side already shrunk by an
integer block mean in its own type, ``decode_image(..., reduce_to=resolution)``).
:func:`prepare_image` applies that same block mean to an array that did not come through the
decoder, then resizes once to the backbone's input side and gives it three channels; the Ray
Data decode stage and the :class:`~medcae.inference.predictor.Predictor` both call it, so an image
gets
the same answer offline and online, as bytes or as an array. :func:`to_model_input` then only
scales and normalises.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from medcae.data.pixels import block_mean, reduce_factor

#: Bumped whenever :func:`prepare_image` changes what it produces (part of feature-store keys).
#: 2: images at least twice the resolution are first shrunk by an integer block mean in their
#: own type (while decoding, or here for arrays), in training and serving alike.
PREPARE_VERSION = 2


def as_uint8_image(image: np.ndarray) -> np.ndarray:
    """An ``(H, W)`` or ``(H, W, 3)`` uint8 view of a decoded image array.

    ``(H, W, 1)`` loses its channel axis, ``(H, W, 4)`` its alpha; other dtypes are min-max
    scaled to 0..255 (a constant image becomes 0).

    Raises:
        ValueError: Any other shape, naming it.
    """
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] in (1, 4):
        arr = arr[..., 0] if arr.shape[2] == 1 else arr[..., :3]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)) or min(arr.shape[:2]) < 1:
        raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def prepare_image(image: np.ndarray, resolution: int) -> np.ndarray:
    """Resize one decoded image to the network's input and give it three channels.

    An image whose sides are both at least ``2 * resolution`` is first shrunk by the integer
    factor ``min(H, W) // resolution`` (rounded block mean in its own type, as
    ``decode_image(..., reduce_to=resolution)`` does); then bilinear resampling (antialiased
    when shrinking) on the uint8 pixels; grayscale is repeated to RGB after resizing. An image
    already ``(resolution, resolution, 3)`` uint8 is returned as is, so calling this twice
    changes nothing.

    Args:
        image: ``(H, W)`` or ``(H, W, 3)`` (see :func:`as_uint8_image` for other forms).
        resolution: Output side length.

    Returns:
        uint8 ``(resolution, resolution, 3)``.
    """
    arr = np.asarray(image)
    if arr.ndim in (2, 3):  # what decoding with reduce_to does; a no-op on decoded images
        k = reduce_factor(arr.shape[0], arr.shape[1], resolution)
        arr = block_mean(arr, k) if k > 1 else arr
    arr = as_uint8_image(arr)
    if arr.shape[:2] != (resolution, resolution):
        resized = Image.fromarray(arr).resize((resolution, resolution), Image.Resampling.BILINEAR)
        arr = np.asarray(resized, dtype=np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return arr


def prepare_batch(images: np.ndarray | Sequence[np.ndarray], resolution: int) -> np.ndarray:
    """:func:`prepare_image` over a batch of any sizes and modes.

    Returns:
        uint8 ``(batch, resolution, resolution, 3)``; a batch already in that form is returned
        without a copy.
    """
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        if images.ndim == 4 and images.shape[1:] == (resolution, resolution, 3):
            return images
    out = np.empty((len(images), resolution, resolution, 3), np.uint8)
    for i, image in enumerate(images):
        out[i] = prepare_image(image, resolution)
    return out


def to_model_input(
    images: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    channels_last: bool = True,
) -> torch.Tensor:
    """Scale prepared images to 0..1 and normalise them per channel.

    Args:
        images: uint8 ``(batch, side, side, 3)`` from :func:`prepare_batch`.
        mean: Per-channel mean on the 0..1 scale.
        std: Per-channel std on the 0..1 scale.
        channels_last: Return a channels-last tensor (faster convolutions on CPU).

    Returns:
        float32 ``(batch, 3, side, side)``.

    Raises:
        ValueError: If ``images`` is not a uint8 ``(batch, side, side, 3)`` array.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"expected prepared uint8 images (N, side, side, 3), got {images.dtype} "
            f"{tuple(images.shape)}; call prepare_batch first"
        )
    if not images.flags.writeable:  # e.g. a zero-copy Ray Data batch; torch wants writable
        images = images.copy()
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    x = (x - m) / s
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def combine_taps(feats: dict[str, torch.Tensor], taps: Sequence[str]) -> torch.Tensor:
    """Merge the feature maps of several taps into one map.

    Maps are average-pooled to the smallest spatial size among them and concatenated on
    channels; a single tap is returned as is.

    Args:
        feats: ``{tap: (batch, C_t, h_t, w_t)}``.
        taps: Which taps to merge, in order.

    Returns:
        ``(batch, sum(C_t), h, w)``.
    """
    maps = [feats[t] for t in taps]
    if len(maps) == 1:
        return maps[0]
    h = min(m.shape[-2] for m in maps)
    w = min(m.shape[-1] for m in maps)
    return torch.cat([F.adaptive_avg_pool2d(m, (h, w)) for m in maps], dim=1)
