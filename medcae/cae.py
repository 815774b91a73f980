"""Convolutional auto-encoder on backbone feature maps.

The CAE standardises its input per channel with statistics of the unlabeled training maps
(stored as buffers, so a saved state dict is self-contained), encodes to a ``latent_channels``
code map, and decodes back to the standardised input. Its pooled code map is the image's
feature vector for the classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medcae.config import CAEConfig


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _up_block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    if stride == 1:
        return _block(cin, cout)
    return nn.Sequential(
        nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ConvAutoEncoder(nn.Module):
    """Denoising convolutional auto-encoder.

    Args:
        in_channels: Channels of the backbone feature map.
        cfg: Shape and noise settings.

    Raises:
        ValueError: If ``in_channels`` is not positive.
    """

    input_mean: torch.Tensor  # buffers, (1, C, 1, 1)
    input_std: torch.Tensor

    def __init__(self, in_channels: int, cfg: CAEConfig):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.cfg = cfg
        self.in_channels = in_channels
        chans = (in_channels, *cfg.channels)
        strides = [2 if (i == 0 and cfg.downsample) else 1 for i in range(len(cfg.channels))]
        enc = [_block(a, b, s) for a, b, s in zip(chans[:-1], chans[1:], strides)]
        self.encoder = nn.Sequential(*enc, nn.Conv2d(chans[-1], cfg.latent_channels, 1))
        rchans = (cfg.latent_channels, *reversed(cfg.channels))
        dec = [_up_block(a, b, s) for a, b, s in zip(rchans[:-1], rchans[1:], reversed(strides))]
        self.decoder = nn.Sequential(*dec, nn.Conv2d(rchans[-1], in_channels, 1))
        self.register_buffer("input_mean", torch.zeros(1, in_channels, 1, 1))
        self.register_buffer("input_std", torch.ones(1, in_channels, 1, 1))

    def set_input_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Set the per-channel standardisation.

        Args:
            mean: ``(C,)`` channel means of the unlabeled training maps.
            std: ``(C,)`` channel stds (values below 1e-6 are clamped).
        """
        self.input_mean.copy_(mean.view(1, -1, 1, 1))
        self.input_std.copy_(std.clamp_min(1e-6).view(1, -1, 1, 1))

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """Standardise raw maps ``(batch, C, h, w)`` with the stored channel statistics."""
        return (x.float() - self.input_mean) / self.input_std

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Code map of raw maps: ``(batch, C, h, w)`` -> ``(batch, latent, h', w')``."""
        return self.encoder(self.standardise(x))

    def forward(self, x: torch.Tensor, noise_std: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruct standardised maps, optionally from a noisy input.

        Args:
            x: Raw feature maps ``(batch, C, h, w)``.
            noise_std: Std of Gaussian noise added to the standardised input.

        Returns:
            ``(reconstruction, target)``, both standardised ``(batch, C, h, w)``.
        """
        target = self.standardise(x)
        noisy = target + noise_std * torch.randn_like(target) if noise_std > 0 else target
        recon = self.decoder(self.encoder(noisy))
        if recon.shape[-2:] != target.shape[-2:]:
            recon = F.interpolate(
                recon, size=target.shape[-2:], mode="bilinear", align_corners=False
            )
        return recon, target

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Feature vector per image: the code map pooled as ``cfg.pool`` says.

        Args:
            x: Raw feature maps ``(batch, C, h, w)``.

        Returns:
            ``(batch, D)`` with ``D = latent`` (avg), ``2*latent`` (avgmax) or ``latent*h'*w'``.
        """
        z = self.encode(x)
        if self.cfg.pool == "avg":
            return z.mean(dim=(2, 3))
        if self.cfg.pool == "avgmax":
            return torch.cat([z.mean(dim=(2, 3)), z.amax(dim=(2, 3))], dim=1)
        return z.flatten(1)

    @torch.no_grad()
    def reconstruction_error(self, x: torch.Tensor) -> torch.Tensor:
        """Mean squared reconstruction error per image, ``(batch,)``, in standardised units."""
        recon, target = self(x)
        return (recon - target).pow(2).mean(dim=(1, 2, 3))
