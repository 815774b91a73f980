"""Image preprocessing shared by extraction, evaluation and serving.

One function, :func:`to_model_input`, turns uint8 images into the normalised RGB tensor a
backbone expects, so preprocessing cannot drift between training and serving.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def to_model_input(
    images: np.ndarray,
    resolution: int,
    mean: Sequence[float],
    std: Sequence[float],
    channels_last: bool = True,
) -> torch.Tensor:
    """Resize, replicate grayscale to RGB, and normalise a batch of images.

    Args:
        images: uint8 ``(batch, H, W)`` grayscale or ``(batch, H, W, 3)`` RGB.
        resolution: Output side length.
        mean: Per-channel mean on the 0..1 scale.
        std: Per-channel std on the 0..1 scale.
        channels_last: Return a channels-last tensor (faster convolutions on CPU).

    Returns:
        float32 ``(batch, 3, resolution, resolution)``.

    Raises:
        ValueError: If ``images`` does not have one of the two accepted shapes.
    """
    if not images.flags.writeable:  # e.g. a zero-copy Ray Data batch; torch wants writable
        images = images.copy()
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.ndim == 3:
        x = x.unsqueeze(1).expand(-1, 3, -1, -1)
    elif x.ndim == 4 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"images must be (N, H, W) or (N, H, W, 3), got {tuple(images.shape)}")
    x = x.float().div_(255.0)
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(
            x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
        )
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
