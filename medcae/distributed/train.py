"""Training the CAE with Ray Train (``TorchTrainer``, DDP) on Ray Data shards of feature maps."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from medcae.config import CAEConfig, TrainConfig
from medcae.engine import build_cae, run_epoch

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"


def _batches(shard: Any, batch_size: int, shuffle_seed: int | None):
    kwargs = {"local_shuffle_buffer_size": batch_size * 8, "local_shuffle_seed": shuffle_seed}
    it = shard.iter_torch_batches(
        batch_size=batch_size, dtypes=torch.float32, **(kwargs if shuffle_seed is not None else {})
    )
    return ({"maps": b["data"]} for b in it)


def _restore(model: torch.nn.Module, opt: torch.optim.Optimizer, history: list[dict]) -> int:
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0
    with ckpt.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    _unwrap(model).load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    history.extend(json.loads(state["history"]))
    log.info("resumed from checkpoint at epoch %d", state["epoch"])
    return int(state["epoch"])


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _report(
    model: torch.nn.Module, opt: torch.optim.Optimizer, metrics: dict, history: list[dict]
) -> None:
    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if ray.train.get_context().get_world_rank() == 0:
            state = {
                "model": _unwrap(model).state_dict(),
                "optimizer": opt.state_dict(),
                "epoch": metrics["epoch"],
                "rng": torch.get_rng_state(),
                "history": json.dumps(history),
            }
            torch.save(state, Path(d) / STATE_FILE)
            ckpt = Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=ckpt)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function: DDP training of the CAE, one report + checkpoint per epoch.

    Args:
        config: ``{"cae": CAEConfig dict, "in_channels": C, "mean": [C], "std": [C]}``.
    """
    cfg = CAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["cae"].items()})
    model = build_cae(
        config["in_channels"], cfg, torch.tensor(config["mean"]), torch.tensor(config["std"])
    )
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history: list[dict] = []
    start = _restore(model, opt, history)
    rank = ray.train.get_context().get_world_rank()
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        train = run_epoch(
            model,
            _batches(ray.train.get_dataset_shard("train"), cfg.batch_size, cfg.seed * 1000 + epoch),
            opt,
            device,
            cfg.noise_std,
        )
        val = run_epoch(
            model, _batches(ray.train.get_dataset_shard("val"), cfg.batch_size, None), None, device
        )
        secs = time.perf_counter() - t0
        metrics = {
            "epoch": epoch + 1,
            "train_loss": train["loss"],
            "val_loss": val["loss"],
            "samples_per_s": train["samples"] / secs,
            "epoch_s": secs,
        }
        if rank == 0:
            log.info(
                "epoch %d/%d train_loss %.4f val_loss %.4f %.0f samples/s ETA %.0fs",
                epoch + 1,
                cfg.epochs,
                train["loss"],
                val["loss"],
                metrics["samples_per_s"],
                secs * (cfg.epochs - epoch - 1),
            )
        history.append(metrics)
        _report(model, opt, metrics, history)


def train_cae(
    train_maps: np.ndarray,
    val_maps: np.ndarray,
    cae: CAEConfig,
    train: TrainConfig,
    mean: torch.Tensor,
    std: torch.Tensor,
    storage_path: str | Path,
    name: str = "cae",
    max_failures: int = 0,
) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """Train the CAE on Ray Train and return the final weights and per-epoch metrics.

    Args:
        train_maps: Unlabeled feature maps ``(N, C, h, w)``.
        val_maps: Validation feature maps ``(M, C, h, w)`` (labels unused).
        cae: CAE configuration.
        train: Workers, GPU and CPU per worker.
        mean: ``(C,)`` channel means for standardisation.
        std: ``(C,)`` channel stds.
        storage_path: Where Ray Train writes checkpoints (local path or pyarrow URI).
        name: Run name under ``storage_path``; re-using it resumes from its last checkpoint.
        max_failures: Worker-group restarts allowed.

    Returns:
        ``(state_dict, history)``.
    """
    storage = str(storage_path) if "://" in str(storage_path) else os.path.abspath(storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cae": asdict(cae),
            "in_channels": int(train_maps.shape[1]),
            "mean": mean.tolist(),
            "std": std.tolist(),
        },
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
        datasets={
            "train": ray.data.from_numpy(np.ascontiguousarray(train_maps)),
            "val": ray.data.from_numpy(np.ascontiguousarray(val_maps)),
        },
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    return state["model"], json.loads(state["history"])
