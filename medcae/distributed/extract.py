"""The frozen backbone as a Ray Data ``map_batches`` stage on an actor pool."""

from __future__ import annotations

import logging

import numpy as np
import ray

from medcae.config import BackboneConfig
from medcae.distributed.runtime import require_placeable, stage_threads
from medcae.model.features import FeatureExtractor

log = logging.getLogger(__name__)


class BackboneStage:
    """Ray Data callable class: one frozen backbone per actor, reused across batches.

    Args:
        backbone: :func:`backbone_dict` of the config.
        use_gpu: Run on the actor's GPU.
        threads: Torch intra-op threads in the actor (0 = leave torch's default).
        runtime: Inference runtime (``auto``, ``torch``, ``onnxruntime``, ``openvino``).
        graph_dir: Where exported graphs are cached (shared by the actors of a store).

    Input column ``image`` (prepared uint8 ``(B, side, side, 3)``) becomes ``maps``
    ``(B, C, h, w)`` and ``final`` ``(B, C_final)``; other columns pass through.
    """

    def __init__(
        self,
        backbone: dict,
        use_gpu: bool = False,
        threads: int = 0,
        runtime: str = "auto",
        graph_dir: str | None = None,
    ):
        import torch

        if threads:
            torch.set_num_threads(threads)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.extractor = FeatureExtractor(
            BackboneConfig(**backbone),
            device,
            runtime=runtime,
            graph_dir=graph_dir,
            threads=threads,
        )
        self.shapes: dict[str, tuple[int, ...]] | None = None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v for k, v in batch.items() if k != "image"}
        if len(batch["image"]) == 0:  # every file of the batch was undecodable
            return out | self._empty()
        feats = self.extractor(batch["image"])
        self.shapes = {k: v.shape[1:] for k, v in feats.items()}
        return out | feats

    def _empty(self) -> dict[str, np.ndarray]:
        if self.shapes is None:
            probe = np.zeros((1, *([self.extractor.cfg.resolution] * 2), 3), np.uint8)
            self.shapes = {k: v.shape[1:] for k, v in self.extractor(probe).items()}
        return {k: np.zeros((0, *s), np.float32) for k, s in self.shapes.items()}


def backbone_stage(
    ds: ray.data.Dataset,
    backbone: BackboneConfig,
    batch_size: int = 64,
    actors: int = 1,
    use_gpu: bool = False,
    threads: int = 0,
    runtime: str = "auto",
    graph_dir: str | None = None,
) -> ray.data.Dataset:
    """``ds`` (column ``image``) through :class:`BackboneStage` on an actor pool.

    Each actor asks for one GPU (``use_gpu``) or for ``threads`` CPUs; 0 sizes that from the
    cluster's largest node (its CPUs, at most the cores of this machine, over the actors). A
    request no node can hold fails at once, or after the placement wait (see
    :func:`~medcae.distributed.runtime.require_placeable`), naming the resource.
    """
    threads = threads or stage_threads(actors)
    request = {"GPU": 1.0, "CPU": 1.0} if use_gpu else {"CPU": float(threads)}
    require_placeable(request, "backbone actor (--extract-threads / --use-gpu)")
    return ds.map_batches(
        BackboneStage,
        fn_constructor_kwargs={
            "backbone": backbone_dict(backbone),
            "use_gpu": use_gpu,
            "threads": threads,
            "runtime": runtime,
            "graph_dir": graph_dir,
        },
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=request.get("GPU", 0),
        num_cpus=request["CPU"],
        batch_format="numpy",
    )


def backbone_dict(cfg: BackboneConfig) -> dict:
    """The config as constructor keyword arguments (JSON-ready)."""
    return {
        "name": cfg.name,
        "taps": list(cfg.taps),
        "resolution": cfg.resolution,
        "weights": cfg.weights,
        "precision": cfg.precision,
    }
