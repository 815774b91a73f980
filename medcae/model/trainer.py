"""The CAE trainer: the loop over epochs and its one checkpoint format (plain PyTorch, no Ray).

:func:`fit_cae` trains the auto-encoder over any iterable of batches, from a start state, and
calls back after every epoch. The Ray Train worker, the Tune trial, the evidence runs and the
tests all call it; they differ only in where batches come from and what the callback does
(report to Train, score on validation, nothing).

A checkpoint is a dict of tensors and strings (loaded with ``weights_only=True``): weights,
optimizer, epochs done, RNG state, history, the resolved CAE config and the fingerprint of the
data it was trained on. Resuming with another config or other data raises
:class:`CheckpointMismatch`, naming the difference.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medcae.config import CAEConfig, ConfigError
from medcae.model.epoch import run_epoch, unwrap

CHECKPOINT_FILE = "state.pt"
#: Fields that may differ when resuming: more epochs continue a finished run.
RESUMABLE_CHANGES = frozenset({"epochs", "patience"})
#: Fields that checkpoints written before they existed lack: read as these values.
ADDED_FIELDS: dict[str, Any] = {"groups": []}

Batches = Iterable[dict[str, torch.Tensor]]


class CheckpointMismatch(ConfigError):
    """A checkpoint was trained with another config or on other data than this run (a user
    error: one ``error:`` line at the command line)."""


def resolved_cae_config(cfg: CAEConfig, in_channels: int) -> dict[str, Any]:
    """The CAE config a checkpoint records: every field, plus the input channels."""
    return {
        **asdict(cfg),
        "channels": list(cfg.channels),
        "groups": list(cfg.groups),
        "in_channels": int(in_channels),
    }


@dataclass
class TrainerState:
    """Where training stands after an epoch.

    Attributes:
        model: The CAE (possibly wrapped in DDP).
        optimizer: Its optimizer.
        epoch: Epochs completed.
        history: One metrics dict per completed epoch, across restarts.
        config: :func:`resolved_cae_config` of this run.
        fingerprint: Fingerprint of the training data (the feature store's key).
        restored_from: Epoch this attempt resumed from (0: started fresh).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int
    history: list[dict[str, Any]]
    config: dict[str, Any]
    fingerprint: str
    restored_from: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    def checkpoint(self) -> dict[str, Any]:
        """This state as a checkpoint dict (see :func:`save_checkpoint`)."""
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "rng": torch.get_rng_state(),
            "history": json.dumps(self.history),
            "config": json.dumps(self.config, sort_keys=True),
            "fingerprint": self.fingerprint,
            **self.extra,
        }


def save_checkpoint(state: dict[str, Any], folder: str | Path) -> Path:
    """Write a checkpoint dict to ``folder/state.pt`` atomically (temp file, then rename)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".state.", dir=folder)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, folder / CHECKPOINT_FILE)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return folder / CHECKPOINT_FILE


def load_checkpoint(folder: str | Path) -> dict[str, Any]:
    """Load ``folder/state.pt`` without unpickling arbitrary objects."""
    return torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def check_resumable(
    state: dict[str, Any], config: dict[str, Any], fingerprint: str, where: str = "checkpoint"
) -> None:
    """Refuse to resume from a checkpoint of another config or other data.

    Raises:
        CheckpointMismatch: Naming each differing field (old vs new) or both fingerprints.
    """
    old = {**ADDED_FIELDS, **json.loads(state.get("config", "{}"))}
    diffs = [
        f"cae.{k}: checkpoint {old.get(k)!r}, this run {config.get(k)!r}"
        for k in sorted(set(old) | set(config))
        if k not in RESUMABLE_CHANGES and old.get(k) != config.get(k)
    ]
    if state.get("fingerprint", "") != fingerprint:
        diffs.append(f"data: checkpoint {state.get('fingerprint')!r}, this run {fingerprint!r}")
    if diffs:
        raise CheckpointMismatch(
            f"cannot resume from {where}: it was trained with a different "
            f"{'config' if old != config else 'data set'} ({'; '.join(diffs)}); "
            "use another run name, or the settings it was trained with"
        )


def make_optimizer(model: nn.Module, cfg: CAEConfig) -> torch.optim.Optimizer:
    """AdamW with the config's learning rate and weight decay."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _local_mean(stats: dict[str, float]) -> float:
    return stats["loss"]


def fit_cae(
    model: nn.Module,
    cfg: CAEConfig,
    train_batches: Callable[[int], Batches],
    *,
    in_channels: int,
    fingerprint: str = "",
    val_batches: Callable[[], Batches] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    start: dict[str, Any] | None = None,
    on_epoch: Callable[[TrainerState, dict[str, Any]], None] | None = None,
    device: torch.device | str = "cpu",
    reduce: Callable[[dict[str, float]], float] = _local_mean,
    world_size: int = 1,
) -> TrainerState:
    """Train the CAE for ``cfg.epochs`` epochs (from ``start``, if given).

    Args:
        model: A :class:`~medcae.model.cae.ConvAutoEncoder`, possibly wrapped in DDP.
        cfg: CAE configuration (epochs, lr, weight decay, noise).
        train_batches: ``train_batches(epoch)`` gives that epoch's ``{"maps": (B, C, h, w)}``
            batches (the callable owns shuffling and seeding).
        in_channels: ``C`` of the maps (recorded in the checkpoint config).
        fingerprint: Fingerprint of the training data (recorded, checked on resume).
        val_batches: Validation batches, evaluated without noise after each epoch.
        optimizer: Optimizer to step; default :func:`make_optimizer`.
        start: A checkpoint dict to resume from (weights, optimizer, epoch, RNG, history).
        on_epoch: Called after every epoch with the state and that epoch's metrics.
        device: Device the batches are moved to.
        reduce: Maps this worker's ``{"loss", "samples"}`` to the global mean loss (DDP).
        world_size: Workers that each see ``samples`` of the epoch (for the throughput).

    With ``cfg.patience`` and ``val_batches``, training stops early on the validation loss and
    the model ends with its best epoch's weights (:class:`EarlyStopper`).

    Returns:
        The final state.

    Raises:
        CheckpointMismatch: ``start`` was trained with another config or on other data.
    """
    optimizer = optimizer or make_optimizer(model, cfg)
    config = resolved_cae_config(cfg, in_channels)
    state = TrainerState(model, optimizer, 0, [], config, fingerprint)
    if start is not None:
        check_resumable(start, config, fingerprint)
        unwrap(model).load_state_dict(start["model"])
        optimizer.load_state_dict(start["optimizer"])
        torch.set_rng_state(start["rng"])
        state.history = json.loads(start["history"])
        state.epoch = state.restored_from = int(start["epoch"])
    stopper = EarlyStopper(cfg.patience if val_batches is not None else 0, state.history)
    for epoch in range(state.epoch, cfg.epochs):
        if stopper.done(state.epoch):
            break  # a resumed run that had already stopped early
        t0 = time.perf_counter()
        train = run_epoch(model, train_batches(epoch), optimizer, device, cfg.noise_std)
        metrics: dict[str, Any] = {"epoch": epoch + 1, "train_loss": reduce(train)}
        if val_batches is not None:
            metrics["val_loss"] = reduce(run_epoch(model, val_batches(), None, device))
            stopper.update(epoch + 1, metrics["val_loss"], unwrap(model))
            metrics["best_epoch"] = stopper.best_epoch
        secs = time.perf_counter() - t0
        metrics |= {
            "samples_per_s": train["samples"] * world_size / max(secs, 1e-9),
            # Optimizer steps this epoch and the global batch each took (every DDP worker
            # steps together on its equal share).
            "steps": int(train["steps"]),
            "samples_per_step": train["samples"] * world_size / max(train["steps"], 1),
            "epoch_s": secs,
            "restored_from": state.restored_from,
            "time": time.time(),
        }
        state.epoch = epoch + 1
        state.history.append(metrics)
        if on_epoch is not None:
            on_epoch(state, metrics)
        if stopper.done(state.epoch):
            break
    stopper.restore(unwrap(model))
    return state


class EarlyStopper:
    """Early stopping on the validation reconstruction loss, keeping the best epoch's weights.

    Training stops once ``patience`` epochs have passed without a lower ``val_loss`` than the
    best so far; :meth:`restore` then loads the best epoch's weights. The decision is taken
    from the history alone, so a run resumed from a checkpoint stops where the uninterrupted
    one would have (the best weights of epochs before the restart live in that run's
    checkpoints, which the Ray Train driver ranks by ``val_loss``).

    Args:
        patience: Epochs without improvement before stopping; 0 disables it.
        history: Metrics of the epochs already done (a resumed run's).
    """

    def __init__(self, patience: int, history: list[dict[str, Any]]):
        self.patience = patience
        scored = [(h["val_loss"], h["epoch"]) for h in history if "val_loss" in h]
        self.best_loss, self.best_epoch = min(scored) if scored else (float("inf"), 0)
        self.weights: dict[str, torch.Tensor] | None = None

    def update(self, epoch: int, val_loss: float, model: nn.Module) -> None:
        """Record an epoch's validation loss (and the weights, if it is the best yet)."""
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch = val_loss, epoch
            if self.patience:
                self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def done(self, epoch: int) -> bool:
        """Whether training should stop after ``epoch`` epochs."""
        return (
            bool(self.patience) and self.best_epoch > 0 and epoch - self.best_epoch >= self.patience
        )

    def restore(self, model: nn.Module) -> None:
        """Load the best epoch's weights into ``model`` (when they were seen in this process)."""
        if self.patience and self.weights is not None:
            model.load_state_dict(self.weights)
