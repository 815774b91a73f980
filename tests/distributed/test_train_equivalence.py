"""Ray Train DDP: one and two workers, in memory and streaming shards from storage, step alike."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medcae.config import CAEConfig, TrainConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _maps(n: int, seed: int) -> np.ndarray:
    """Feature maps ``(n, 16, 4, 4)`` with low-rank structure a CAE can learn to compress."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(123).normal(size=(4, 16 * 4 * 4))
    x = rng.normal(size=(n, 4)) @ basis + 0.1 * rng.normal(size=(n, 16 * 4 * 4))
    return x.reshape(n, 16, 4, 4).astype(np.float32)


def test_one_and_two_workers_take_the_same_steps_to_the_same_weights(ray_session, tmp_path):
    """Full-batch epochs with noise off: DDP's averaged gradient over two equal halves is the
    one worker's gradient over the whole, whatever order the shards come in, so the weights
    must agree to float rounding. (Smaller batches differ by the order Ray Data hands them out;
    the streaming test below checks their steps and samples per step.)"""
    from medcae.distributed.train import train_cae
    from medcae.model.epoch import build_cae, channel_stats, errors_all

    train, val = _maps(256, 0), _maps(128, 1)
    mean, std = channel_stats(train)
    cae = CAEConfig(
        channels=(32,), latent_channels=4, epochs=6, batch_size=256, lr=1e-2, noise_std=0.0
    )
    untrained = float(errors_all(build_cae(16, cae, mean, std), val).mean())
    runs = {}
    for workers in (1, 2):
        cfg = TrainConfig(num_workers=workers, cpus_per_worker=1.0)
        runs[workers] = train_cae(train, val, cae, cfg, mean, std, tmp_path, f"w{workers}")
    one, two = runs[1], runs[2]
    assert [h["epoch"] for h in two.history] == [1, 2, 3, 4, 5, 6]
    assert len(two.worker_nodes) == 2 and len(one.worker_nodes) == 1
    for h1, h2 in zip(one.history, two.history, strict=True):
        assert (h1["steps"], h1["samples_per_step"]) == (1, 256.0), h1
        assert (h2["steps"], h2["samples_per_step"]) == (1, 256.0), h2
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], rel=1e-5)
        assert h2["val_loss"] == pytest.approx(h1["val_loss"], rel=1e-5)
    worst = 0.0
    for name, w1 in one.state.items():
        w2 = two.state[name]
        worst = max(worst, float((w2.double() - w1.double()).abs().max()))
        assert w1.shape == w2.shape, name
        np.testing.assert_allclose(w2.numpy(), w1.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
    # Early stopping is on (patience 3), so Ray Train keeps the 2 checkpoints of lowest val loss.
    snapshot = json.loads((tmp_path / "w2" / "checkpoint_manager_snapshot.json").read_text())
    results = snapshot["checkpoint_results"]
    on_disk = {d.name for d in (tmp_path / "w2").glob("checkpoint_*") if d.is_dir()}
    assert on_disk == {r["checkpoint_dir_name"] for r in results}
    kept = sorted(r["metrics"]["epoch"] for r in results)
    best = sorted(sorted(range(1, 7), key=lambda e: two.history[e - 1]["val_loss"])[:2])
    assert cae.patience == 3 and kept == best, (kept, best)
    a, b = one.history[-1]["val_loss"], two.history[-1]["val_loss"]
    assert b < 0.9 * untrained, (b, untrained)  # and they did learn
    # The weights returned are the trained ones: their error matches the reported val loss.
    model = build_cae(16, cae, mean, std)
    model.load_state_dict(two.state)
    assert float(errors_all(model, val).mean()) == pytest.approx(b, rel=1e-3)
    print(
        f"\n1 worker val_loss {a:.6f}, 2 workers {b:.6f} (untrained {untrained:.4f});"
        f" largest weight difference {worst:.2e}"
    )


def test_two_workers_streaming_their_shards_from_storage_learn_the_same(ray_session, tmp_path):
    """Stores larger than the object store: each worker reads its equal shard from Parquet."""
    from helpers import write_maps_parquet

    from medcae.data.shards import list_files
    from medcae.distributed.train import StreamedSplits, train_cae
    from medcae.model.epoch import channel_stats

    train, val = _maps(512, 0), _maps(128, 1)
    write_maps_parquet(tmp_path / "store" / "split=train", train, files=5)
    write_maps_parquet(tmp_path / "store" / "split=val", val, files=2)
    files = {s: tuple(list_files(str(tmp_path / "store"), [s])) for s in ("train", "val")}
    mean, std = channel_stats(train)
    cae = CAEConfig(channels=(32,), latent_channels=4, epochs=5, batch_size=64, lr=3e-3)
    held = train_cae(train, val, cae, TrainConfig(), mean, std, tmp_path, "held")
    streamed = train_cae(
        StreamedSplits(files["train"]),
        StreamedSplits(files["val"]),
        cae,
        TrainConfig(num_workers=2, cpus_per_worker=1.0),
        mean,
        std,
        tmp_path,
        "streamed",
        in_channels=16,
    )
    assert [h["epoch"] for h in streamed.history] == [1, 2, 3, 4, 5]
    assert len(streamed.worker_nodes) == 2
    # Each of the 2 workers takes batch_size // 2 rows a step: the same 8 steps of 64 a epoch.
    for h1, h2 in zip(held.history, streamed.history, strict=True):
        assert (h1["steps"], h1["samples_per_step"]) == (8, 64.0), h1
        assert (h2["steps"], h2["samples_per_step"]) == (8, 64.0), h2
    a, b = held.history[-1]["val_loss"], streamed.history[-1]["val_loss"]
    assert abs(a - b) / a < 0.15, (a, b)
    print(f"\nheld 1 worker val_loss {a:.4f}; streamed shards 2 workers {b:.4f}")
