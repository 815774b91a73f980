"""Training the CAE with Ray Train (``TorchTrainer``, DDP) on Ray Data shards of feature maps.

Every worker reports every epoch (``ray.train.report`` is a barrier in Train V2); rank 0
attaches a checkpoint holding model, optimizer, epoch, RNG state and history. A restarted
worker group (``FailureConfig``) or a re-run with the same name and storage path resumes
from the latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from medcae.config import CAEConfig, TrainConfig
from medcae.data.shards import ShardFile, shard_batches, shard_plan
from medcae.distributed.runtime import require_placeable
from medcae.distributed.store import storage_uri
from medcae.model.epoch import build_cae
from medcae.model.norm import global_batch_norm
from medcae.model.trainer import (
    CHECKPOINT_FILE,
    TrainerState,
    check_resumable,
    fit_cae,
    load_checkpoint,
    resolved_cae_config,
    save_checkpoint,
)

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    """What a training run produced.

    Attributes:
        state: Final (or best, with a score attribute) CAE ``state_dict``.
        history: Per-epoch metrics, across restarts.
        worker_nodes: Ray node id of each rank in the last attempt.
        checkpoint: Path or URI of the checkpoint the state came from.
        restored_from: Epoch the last attempt resumed from (0: started fresh).
    """

    state: dict[str, torch.Tensor]
    history: list[dict[str, Any]]
    worker_nodes: list[str]
    checkpoint: str
    restored_from: int


def _batches(shard: Any, batch_size: int, shuffle_seed: int | None):
    kwargs = {"local_shuffle_buffer_size": batch_size * 8, "local_shuffle_seed": shuffle_seed}
    it = shard.iter_torch_batches(
        batch_size=batch_size, dtypes=torch.float32, **(kwargs if shuffle_seed is not None else {})
    )
    return ({"maps": b["maps"]} for b in it)


@dataclass(frozen=True)
class StreamedSplits:
    """Splits of a feature store that each Train worker streams straight from storage.

    Attributes:
        files: The splits' Parquet files with their row counts.
    """

    files: tuple[ShardFile, ...]

    @property
    def rows(self) -> int:
        """Rows in all the files."""
        return sum(f.rows for f in self.files)


Source = np.ndarray | ray.data.Dataset | StreamedSplits


def _start_state() -> dict[str, Any] | None:
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return load_checkpoint(d)


def _global_mean(stats: dict[str, float]) -> float:
    """Sample-weighted mean loss over all workers (``stats``: this worker's loss, samples)."""
    t = torch.tensor([stats["loss"] * stats["samples"], stats["samples"]], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return float(t[0] / t[1].clamp(min=1))


def _worker_nodes() -> list[str]:
    node = ray.get_runtime_context().get_node_id()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [node]
    nodes: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(nodes, node)
    return nodes


def _reporter(rank: int, epochs: int, nodes: list[str]):
    """The per-epoch callback: rank 0 logs and checkpoints; every rank reports."""
    wlog = _worker_log()

    def on_epoch(state: TrainerState, metrics: dict[str, Any]) -> None:
        if rank == 0:
            wlog.info(
                "epoch %d/%d train_loss %.4f val_loss %.4f %.0f samples/s ETA %.0fs",
                metrics["epoch"],
                epochs,
                metrics["train_loss"],
                metrics["val_loss"],
                metrics["samples_per_s"],
                metrics["epoch_s"] * (epochs - metrics["epoch"]),
            )
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                state.extra["worker_nodes"] = json.dumps(nodes)
                save_checkpoint(state.checkpoint(), d)
                ckpt = Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)

    return on_epoch


def _worker_log() -> logging.Logger:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log.setLevel(logging.INFO)
    return log


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: feeds :func:`medcae.model.trainer.fit_cae` with this worker's shards.

    Args:
        config: ``{"cae": CAEConfig dict, "in_channels": C, "mean": [C], "std": [C],
            "fingerprint": data key}``.
    """
    cfg = CAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["cae"].items()})
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model = build_cae(
        config["in_channels"], cfg, torch.tensor(config["mean"]), torch.tensor(config["std"])
    )
    # Each worker normalises by the whole global batch's statistics, as one worker would.
    model = ray.train.torch.prepare_model(global_batch_norm(model) if world > 1 else model)
    start = _start_state()
    nodes = _worker_nodes()
    if rank == 0:
        how = f"resumed from checkpoint at epoch {start['epoch']}" if start else "starting"
        _worker_log().info(
            "CAE training %s: %d workers on nodes %s", how, world, sorted(set(nodes))
        )
    per_worker = max(1, cfg.batch_size // world)
    stream = config.get("stream")

    def train_batches(epoch: int):
        seed = cfg.seed * 1000 + epoch * world + rank
        if stream:
            plan = shard_plan(_files(stream["train"]), rank, world, epoch, cfg.seed)
            return shard_batches(plan, per_worker, seed)
        return _batches(ray.train.get_dataset_shard("train"), per_worker, seed)

    def val_batches():
        if stream:
            return shard_batches(shard_plan(_files(stream["val"]), rank, world, 0, 0), 256, None)
        return _batches(ray.train.get_dataset_shard("val"), 256, None)

    fit_cae(
        model,
        cfg,
        train_batches,
        in_channels=config["in_channels"],
        fingerprint=config["fingerprint"],
        val_batches=val_batches,
        start=start,
        on_epoch=_reporter(rank, cfg.epochs, nodes),
        device=ray.train.torch.get_device(),
        reduce=_global_mean,
        world_size=world,
    )


def _files(rows: list[list]) -> list[ShardFile]:
    return [ShardFile(str(p), int(n)) for p, n in rows]


def registered_epoch(run_dir: str | Path) -> int:
    """Epoch of the newest checkpoint Ray Train has registered for a local run folder.

    That is what a restart resumes from. A checkpoint folder can appear on storage before the
    Train controller registers it; a failure in that window resumes from the one before.
    Train V2 records registrations in ``checkpoint_manager_snapshot.json``. Returns 0 when
    nothing is registered (or the snapshot is being rewritten).
    """
    try:
        snap = json.loads((Path(run_dir) / "checkpoint_manager_snapshot.json").read_text())
        return int(snap["latest_checkpoint_result"]["metrics"]["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def as_maps_dataset(data: Source) -> ray.data.Dataset:
    """A Ray Dataset with one tensor column ``maps``, from an array ``(N, C, h, w)`` or as is."""
    if isinstance(data, ray.data.Dataset):
        return data
    if isinstance(data, StreamedSplits):
        raise TypeError("train and val must both be StreamedSplits, or neither")
    return ray.data.from_numpy(np.ascontiguousarray(data)).rename_columns({"data": "maps"})


def train_cae(
    train_data: Source,
    val_data: Source,
    cae: CAEConfig,
    train: TrainConfig,
    mean: torch.Tensor | list[float],
    std: torch.Tensor | list[float],
    storage_path: str | Path,
    name: str = "cae",
    in_channels: int | None = None,
    fingerprint: str = "",
) -> TrainOutcome:
    """Train the CAE on Ray Train and return the final weights and per-epoch metrics.

    Ray Train splits each dataset into equal shards, one per worker (unequal shards would
    deadlock DDP's all-reduce on the last batches).

    Args:
        train_data: Unlabeled feature maps ``(N, C, h, w)``, a Dataset with column ``maps``
            (held in the object store, split by Ray Train), or :class:`StreamedSplits` (each
            worker reads its equal shard straight from storage every epoch).
        val_data: Validation feature maps, the same form (labels unused).
        cae: CAE configuration.
        train: Workers, GPU, CPUs per worker, failures allowed, checkpoints kept.
        mean: ``(C,)`` channel means for standardisation.
        std: ``(C,)`` channel stds.
        storage_path: Where Ray Train writes checkpoints (local path or pyarrow URI).
        name: Run name under ``storage_path``; re-using it resumes from its last checkpoint.
        in_channels: ``C``; needed when ``train_data`` is a Dataset.
        fingerprint: The training data's key (the feature store's); resuming a run whose
            checkpoint has another key or config stops with :class:`CheckpointMismatch`.
    """
    if in_channels is None:
        in_channels = int(np.asarray(train_data).shape[1])  # type: ignore[arg-type]
    run_uri = f"{storage_uri(storage_path)}/{name}"
    _check_resume(run_uri, resolved_cae_config(cae, in_channels), fingerprint)
    worker = {"CPU": train.cpus_per_worker, **({"GPU": 1.0} if train.use_gpu else {})}
    require_placeable(
        worker, "Ray Train worker (--cpus-per-worker / --use-gpu)", count=train.num_workers
    )
    # Early stopping keeps the best epoch: rank the checkpoints by it unless told otherwise.
    score = train.checkpoint_score_attribute or ("val_loss" if cae.patience else None)
    loop_config: dict[str, Any] = {
        "cae": asdict(cae),
        "in_channels": int(in_channels),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "fingerprint": fingerprint,
    }
    datasets = None
    if isinstance(train_data, StreamedSplits) and isinstance(val_data, StreamedSplits):
        loop_config["stream"] = {
            "train": [[f.path, f.rows] for f in train_data.files],
            "val": [[f.path, f.rows] for f in val_data.files],
        }
    else:
        datasets = {"train": as_maps_dataset(train_data), "val": as_maps_dataset(val_data)}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker},
            placement_strategy=train.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_uri(storage_path),
            checkpoint_config=CheckpointConfig(
                num_to_keep=train.num_to_keep or None,
                checkpoint_score_attribute=score,
                checkpoint_score_order="min",
            ),
            failure_config=FailureConfig(max_failures=train.max_failures),
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    last = _load_state(result.checkpoint)
    ckpt = result.checkpoint
    if score and result.best_checkpoints:
        ckpt = min(result.best_checkpoints, key=lambda cm: cm[1][score])[0]
    history = json.loads(last["history"])
    return TrainOutcome(
        (_load_state(ckpt) if ckpt is not result.checkpoint else last)["model"],
        history,
        json.loads(last["worker_nodes"]),
        ckpt.path,
        int(history[-1]["restored_from"]),
    )


def _check_resume(run_uri: str, config: dict[str, Any], fingerprint: str) -> None:
    """Before any worker starts: a run folder's newest checkpoint must match this run."""
    import pyarrow.fs as pafs

    fs, path = (
        pafs.FileSystem.from_uri(run_uri) if "://" in run_uri else (pafs.LocalFileSystem(), run_uri)
    )
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    dirs = sorted(i.path for i in infos if i.base_name.startswith("checkpoint_"))
    for d in reversed(dirs):
        state_file = f"{d}/{CHECKPOINT_FILE}"
        if fs.get_file_info(state_file).type != pafs.FileType.File:
            continue
        with fs.open_input_file(state_file) as fh:
            state = torch.load(fh, map_location="cpu", weights_only=True)
        check_resumable(state, config, fingerprint, where=d)
        return


def _load_state(ckpt: Checkpoint) -> dict[str, Any]:
    with ckpt.as_directory() as d:
        return load_checkpoint(d)
