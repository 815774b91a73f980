"""One epoch of CAE training, and the array helpers around it: build, normalise, embed, score.

The loop over epochs, with checkpoints and early stopping, is :func:`medcae.model.trainer.fit_cae`;
:func:`run_epoch` is its step, fed by any iterable of dict batches.

Ray Train's ``iter_torch_batches`` is one source of batches; a list of dicts in a unit test is
another. Nothing here imports Ray.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from medcae.model.cae import ConvAutoEncoder


def unwrap(model: nn.Module) -> ConvAutoEncoder:
    """The CAE inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)  # type: ignore[no-any-return, arg-type]


def run_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer | None,
    device: torch.device | str = "cpu",
    noise_std: float = 0.0,
) -> dict[str, float]:
    """Train (with an optimizer) or evaluate (without) the CAE for one pass over ``batches``.

    Args:
        model: A :class:`ConvAutoEncoder`, possibly wrapped in DDP.
        batches: Iterable of ``{"maps": (batch, C, h, w)}``.
        optimizer: Optimizer to step, or ``None`` to evaluate without gradients or noise.
        device: Device the batches are moved to.
        noise_std: Denoising noise during training.

    Returns:
        ``{"loss": mean MSE per sample, "samples": count, "steps": batches}``.
    """
    training = optimizer is not None
    model.train(training)
    total, count, steps = 0.0, 0, 0
    with torch.set_grad_enabled(training):
        for batch in batches:
            x = batch["maps"].to(device, non_blocking=True)
            recon, target = model(x, noise_std if training else 0.0)
            loss = nn.functional.mse_loss(recon, target)
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            total += loss.item() * len(x)
            count += len(x)
            steps += 1
    return {"loss": total / max(count, 1), "samples": float(count), "steps": float(steps)}


def shuffled_batches(
    x: torch.Tensor, size: int, gen: torch.Generator
) -> list[dict[str, torch.Tensor]]:
    """One epoch of ``{"maps": (size, C, h, w)}`` batches of ``x`` in a seeded random order."""
    perm = torch.randperm(len(x), generator=gen)
    return [{"maps": x[perm[i : i + size]]} for i in range(0, len(x), size)]


def channel_stats(maps: np.ndarray, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of feature maps, computed in chunks.

    Args:
        maps: ``(N, C, h, w)`` array (float16 or float32).
        chunk: Images per chunk.

    Returns:
        ``(mean, std)``, each ``(C,)`` float32.
    """
    s = np.zeros(maps.shape[1], np.float64)
    ss = np.zeros(maps.shape[1], np.float64)
    for i in range(0, len(maps), chunk):
        m = maps[i : i + chunk].astype(np.float64)
        s += m.sum(axis=(0, 2, 3))
        ss += (m**2).sum(axis=(0, 2, 3))
    n = len(maps) * maps.shape[2] * maps.shape[3]
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean**2, 0.0))
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


def build_cae(in_channels: int, cfg, mean: torch.Tensor, std: torch.Tensor) -> ConvAutoEncoder:
    """Create a seeded CAE with its input statistics set.

    Args:
        in_channels: Channels of the feature maps.
        cfg: :class:`medcae.config.CAEConfig`.
        mean: ``(C,)`` channel means.
        std: ``(C,)`` channel stds.
    """
    torch.manual_seed(cfg.seed)
    model = ConvAutoEncoder(in_channels, cfg)
    model.set_input_stats(mean, std)
    return model


@torch.no_grad()
def embed_all(model: ConvAutoEncoder, maps: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """CAE feature vectors for all maps, ``(N, C, h, w)`` -> ``(N, D)`` float32."""
    model = unwrap(model).eval()
    out = [
        model.embed(torch.tensor(maps[i : i + batch_size], dtype=torch.float32))
        for i in range(0, len(maps), batch_size)
    ]
    return torch.cat(out).numpy()


@torch.no_grad()
def errors_all(model: ConvAutoEncoder, maps: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Per-image reconstruction errors, ``(N,)`` float32."""
    model = unwrap(model).eval()
    out = [
        model.reconstruction_error(torch.tensor(maps[i : i + batch_size], dtype=torch.float32))
        for i in range(0, len(maps), batch_size)
    ]
    return torch.cat(out).numpy()
