"""Batch norm over the global batch when DDP splits it across workers, on CPU as on GPU.

Under DDP each worker sees ``batch_size // N`` samples. A plain ``BatchNorm2d`` normalises by
that share's statistics, so N workers train a different model from one worker on the same
global batch. ``torch.nn.SyncBatchNorm`` fixes that on GPUs only; :class:`GlobalBatchNorm2d`
all-reduces the per-channel sums itself (a differentiable all-reduce, so the gradient flows
through the shared statistics as it does in one process), on any device and backend.

Its parameters and buffers are those of ``BatchNorm2d``: checkpoints and bundles load into
either.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics are those of all workers' batches together."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _world() == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        x64 = x.double()
        local = torch.cat(
            [
                x64.sum(dim=(0, 2, 3)),
                (x64 * x64).sum(dim=(0, 2, 3)),
                x64.new_tensor([x.numel() / c]),
            ]
        )
        total = all_reduce(local)
        n = total[-1]
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean * mean).clamp(min=0.0)
        if self.track_running_stats and self.running_mean is not None:
            self._update_running(mean.detach(), var.detach(), float(n))
        inv = torch.rsqrt(var + self.eps).to(x.dtype)
        y = (x - mean.to(x.dtype)[None, :, None, None]) * inv[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: float) -> None:
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as BatchNorm2d
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        unbiased = var * (n / max(n - 1.0, 1.0))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


def global_batch_norm(model: nn.Module) -> nn.Module:
    """Swap every ``BatchNorm2d`` in ``model`` for a :class:`GlobalBatchNorm2d` holding the same
    parameters and buffers (in place; returns ``model``)."""
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = GlobalBatchNorm2d(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
            )
            synced.load_state_dict(child.state_dict())
            synced.to(next(child.buffers(), torch.empty(0)).device)
            setattr(model, name, synced)
        else:
            global_batch_norm(child)
    return model
