"""Convolutional auto-encoder on backbone feature maps.

The CAE standardises its input per channel with statistics of the unlabeled training maps
(stored as buffers, so a saved state dict is self-contained), encodes to a ``latent_channels``
code map, and decodes back to the standardised input. Its pooled code map is the image's
feature vector for the classifier.

With ``cfg.groups`` (the paper's *hierarchical* form) the maps are several taps concatenated on
channels; each tap gets its own encoder and decoder on its own channels, and the code map is
the tap codes concatenated on channels, ``latent_channels`` per tap.
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


class PerGroup(nn.Module):
    """One module per channel group: splits the input on channels, concatenates the outputs.

    Args:
        parts: One module per group.
        splits: Input channels of each group, in order.
    """

    def __init__(self, parts: list[nn.Module], splits: tuple[int, ...]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.splits = list(splits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, sum(splits), h, w)`` -> the parts' outputs concatenated on channels."""
        chunks = torch.split(x, self.splits, dim=1)
        return torch.cat([p(c) for p, c in zip(self.parts, chunks)], dim=1)


def _coder(cin: int, cfg: CAEConfig) -> tuple[nn.Sequential, nn.Sequential]:
    """Encoder and decoder of one CAE on ``cin`` channels."""
    chans = (cin, *cfg.channels)
    strides = [2 if (i == 0 and cfg.downsample) else 1 for i in range(len(cfg.channels))]
    enc = [_block(a, b, s) for a, b, s in zip(chans[:-1], chans[1:], strides)]
    encoder = nn.Sequential(*enc, nn.Conv2d(chans[-1], cfg.latent_channels, 1))
    rchans = (cfg.latent_channels, *reversed(cfg.channels))
    dec = [_up_block(a, b, s) for a, b, s in zip(rchans[:-1], rchans[1:], reversed(strides))]
    return encoder, nn.Sequential(*dec, nn.Conv2d(rchans[-1], cin, 1))


class ConvAutoEncoder(nn.Module):
    """Denoising convolutional auto-encoder.

    Args:
        in_channels: Channels of the backbone feature map.
        cfg: Shape and noise settings.

    Raises:
        ValueError: If ``in_channels`` is not positive, or ``cfg.groups`` does not add up to it.
    """

    input_mean: torch.Tensor  # buffers, (1, C, 1, 1)
    input_std: torch.Tensor

    def __init__(self, in_channels: int, cfg: CAEConfig):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if cfg.groups and sum(cfg.groups) != in_channels:
            raise ValueError(
                f"cae.groups {list(cfg.groups)} add up to {sum(cfg.groups)} channels, but the "
                f"feature maps have {in_channels}: the groups must be the taps' channel counts"
            )
        self.cfg = cfg
        self.in_channels = in_channels
        self.encoder: nn.Module
        self.decoder: nn.Module
        if len(cfg.groups) > 1:
            coders = [_coder(c, cfg) for c in cfg.groups]
            self.encoder = PerGroup([e for e, _ in coders], tuple(cfg.groups))
            latents = (cfg.latent_channels,) * len(cfg.groups)
            self.decoder = PerGroup([d for _, d in coders], latents)
        else:
            self.encoder, self.decoder = _coder(in_channels, cfg)
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
            ``(batch, D)`` with ``D = L`` (avg), ``2*L`` (avgmax) or ``L*h'*w'`` (flatten), where
            ``L`` is ``latent_channels`` times the number of groups (1 without groups).
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
