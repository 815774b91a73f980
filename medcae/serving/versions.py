"""The version a replica serves, and following a registry alias to a new one without a restart.

A replica holds one :class:`Loaded` at a time. Each request takes the one current when it is
accepted and is answered by it, batched only with requests of the same version; a promotion
loads the new version beside the old (in a thread, while the old keeps answering) and then
makes it current, so no request is dropped or answered by a half-loaded model. A version that
fails to load (corrupt, other backbone weights) is refused with a logged reason and the old
one keeps serving. Ray-free.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from medcae.serving.api import RequestError, predict_each

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    """One loaded version: its predictor, the name and version responses carry, the
    resolution its images are read at, and what identifies its frozen backbone (versions and
    models with the same one share its forward pass)."""

    predictor: Any
    model_id: str
    version: str
    side: int
    backbone_key: str = ""


def backbone_key(meta: dict[str, Any], runtime: str) -> str:
    """What makes two bundles' backbone outputs the same: its config (name, taps, resolution,
    precision, weights), the weights' sha256 and the runtime."""
    backbone = meta.get("config", {}).get("backbone", {})
    weights = meta.get("preprocessing", {}).get("weights_sha256", "")
    return json.dumps([backbone, weights, runtime], sort_keys=True)


def _predict_mixed(items: list[tuple[Loaded, np.ndarray]]) -> list[Any]:
    """Images of versions that share one backbone: one backbone pass for all of them, then
    each version's auto-encoder and head on its own images."""
    out: list[Any] = [None] * len(items)
    backbone = items[0][0].predictor.backbone([image for _, image in items])
    versions: dict[int, list[int]] = {}
    for i, (loaded, _) in enumerate(items):
        versions.setdefault(id(loaded), []).append(i)
    for idx in versions.values():
        predictor = items[idx[0]][0].predictor
        part = {k: v[idx] for k, v in backbone.items()}
        for i, p in zip(idx, predictor.predictions(predictor.head_outputs(part)), strict=True):
            out[i] = p
    return out


def predict_grouped(
    items: list[tuple[Loaded, np.ndarray]],
) -> list[dict[str, Any] | RequestError]:
    """A dynamic batch of ``(version, image)`` from any models: one backbone pass per
    backbone, one head pass per version, answers in order. A batch that fails is predicted
    one image at a time, so only the request of a bad image gets its error."""
    out: list[dict[str, Any] | RequestError | None] = [None] * len(items)
    groups: dict[str, list[int]] = {}
    for i, (loaded, _) in enumerate(items):
        groups.setdefault(loaded.backbone_key or str(id(loaded)), []).append(i)
    for idx in groups.values():
        answers = predict_each(_predict_mixed, [items[i] for i in idx])
        for i, a in zip(idx, answers, strict=True):
            out[i] = a
    return out  # type: ignore[return-value]


class Follower:
    """A daemon thread that polls the registry every ``every_s`` for the version ``ref``
    names now and, when it changed, hands the new version's bundle to ``load`` and the result
    to ``install``. A version that fails is refused once (logged), not retried every poll."""

    def __init__(
        self,
        registry: Any,
        ref: Any,
        current: Callable[[], str],
        load: Callable[[Any], Loaded],
        install: Callable[[Loaded], None],
        every_s: float,
    ):
        self.registry, self.ref, self.every_s = registry, ref, every_s
        self.current, self.load, self.install = current, load, install
        self.refused: set[str] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="medcae-follow", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                self.poll()
            except Exception as err:  # noqa: BLE001 - a registry outage must not stop serving
                log.warning(
                    "registry poll for %s failed: %s: %s", self.ref, type(err).__name__, err
                )

    def poll(self) -> bool:
        """Check once; returns whether a new version was installed."""
        from medcae.registry.models import ModelRef

        info = self.registry.show(self.ref)
        have = self.current()
        if info.version == have or info.version in self.refused:
            return False
        t0 = time.perf_counter()
        try:
            resolved = self.registry.resolve(ModelRef(name=info.name, version=info.version))
            loaded = self.load(resolved)
        except Exception as err:  # noqa: BLE001 - refused; the old version keeps serving
            self.refused.add(info.version)
            log.error(
                "%s version %s refused (%s: %s); still serving version %s",
                info.name,
                info.version,
                type(err).__name__,
                err,
                have,
            )
            return False
        self.install(loaded)
        log.info(
            "%s: now serving version %s (was %s; loaded in %.1fs)",
            self.ref,
            info.version,
            have,
            time.perf_counter() - t0,
        )
        return True
