"""The one CAE trainer and its checkpoint format (core, no Ray)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from medcae.config import CAEConfig
from medcae.model.epoch import build_cae, channel_stats, shuffled_batches
from medcae.model.trainer import (
    CheckpointMismatch,
    EarlyStopper,
    fit_cae,
    load_checkpoint,
    save_checkpoint,
)

CFG = CAEConfig(channels=(16,), latent_channels=4, epochs=4, batch_size=32, lr=3e-3)


def _maps(n: int = 128) -> np.ndarray:
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(3, 8 * 4 * 4))
    return (rng.normal(size=(n, 3)) @ basis).reshape(n, 8, 4, 4).astype(np.float32)


def _fit(cfg: CAEConfig, start=None, fingerprint="data-a", on_epoch=None):
    maps = _maps()
    model = build_cae(8, cfg, *channel_stats(maps))
    x = torch.from_numpy(maps)
    gen = torch.Generator().manual_seed(cfg.seed)
    val = [{"maps": x[:32]}]
    return fit_cae(
        model,
        cfg,
        lambda epoch: shuffled_batches(x, cfg.batch_size, gen),
        in_channels=8,
        fingerprint=fingerprint,
        val_batches=lambda: val,
        start=start,
        on_epoch=on_epoch,
    )


def test_fit_reports_every_epoch_and_learns():
    seen = []
    state = _fit(CFG, on_epoch=lambda s, m: seen.append((s.epoch, m["epoch"])))
    assert seen == [(1, 1), (2, 2), (3, 3), (4, 4)]
    losses = [h["val_loss"] for h in state.history]
    assert losses[-1] < 0.9 * losses[0], losses


def test_checkpoint_round_trip_resumes_where_it_stopped(tmp_path):
    first = _fit(replace(CFG, epochs=2))
    save_checkpoint(first.checkpoint(), tmp_path)
    start = load_checkpoint(tmp_path)  # weights_only: nothing is unpickled
    assert start["epoch"] == 2 and "config" in start and start["fingerprint"] == "data-a"
    resumed = _fit(CFG, start=start)  # more epochs: allowed
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert resumed.restored_from == 2 and resumed.history[-1]["restored_from"] == 2


@pytest.mark.parametrize(
    "change, fingerprint, match",
    [
        ({"lr": 1e-2}, "data-a", r"cae\.lr: checkpoint 0\.003, this run 0\.01"),
        ({"latent_channels": 8}, "data-a", r"cae\.latent_channels: checkpoint 4, this run 8"),
        ({}, "data-b", r"data: checkpoint 'data-a', this run 'data-b'"),
    ],
)
def test_resuming_with_other_config_or_data_names_the_difference(
    tmp_path, change, fingerprint, match
):
    save_checkpoint(_fit(replace(CFG, epochs=1)).checkpoint(), tmp_path)
    with pytest.raises(CheckpointMismatch, match=match):
        _fit(replace(CFG, **change), start=load_checkpoint(tmp_path), fingerprint=fingerprint)


def test_early_stopping_stops_after_patience_and_keeps_the_best_epoch():
    # From epoch 3 on, a huge learning rate wrecks the model: validation loss rises, so training
    # stops `patience` epochs after the best one and ends with the best epoch's weights.
    cfg = replace(CFG, epochs=12, patience=2)

    def wreck(state, metrics):
        if metrics["epoch"] >= 2:
            for group in state.optimizer.param_groups:
                group["lr"] = 50.0

    state = _fit(cfg, on_epoch=wreck)
    losses = [h["val_loss"] for h in state.history]
    best = int(np.argmin(losses)) + 1
    assert best <= 3 and state.epoch == best + 2 < 12, losses
    assert state.history[-1]["best_epoch"] == best
    x = torch.from_numpy(_maps()[:32])
    recon, target = state.model.eval()(x)
    assert nn.functional.mse_loss(recon, target).item() == pytest.approx(losses[best - 1], rel=1e-5)


def test_early_stopping_off_trains_every_epoch():
    state = _fit(replace(CFG, patience=0, epochs=3))
    assert state.epoch == 3 and len(state.history) == 3


def test_a_resumed_run_that_had_stopped_early_does_not_train_on():
    stopper = EarlyStopper(
        2, [{"epoch": e, "val_loss": v} for e, v in [(1, 1.0), (2, 0.5), (3, 0.7), (4, 0.8)]]
    )
    assert stopper.best_epoch == 2 and stopper.done(4) and not stopper.done(3)
    model = nn.Linear(1, 1)
    for epoch, loss in [(5, 0.4), (6, 0.6)]:
        with torch.no_grad():
            model.weight.fill_(epoch)
        stopper.update(epoch, loss, model)
    stopper.restore(model)
    assert model.weight.item() == 5.0 and stopper.best_epoch == 5
