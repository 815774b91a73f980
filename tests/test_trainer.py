"""The one CAE trainer and its checkpoint format (core, no Ray)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from medcae.config import CAEConfig
from medcae.engine import build_cae, channel_stats, shuffled_batches
from medcae.trainer import (
    CheckpointMismatch,
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
