"""The models one server answers for, and what it has seen each of them answer (Ray-free).

A server is given models as ``NAME``, ``NAME@ALIAS``, ``NAME/VERSION`` (registered), a bundle
folder, or any of these as ``LABEL=REF`` to choose the name it is served under. The first is
the default: ``/v1/predict`` answers with it, ``/v1/models/{name}/predict`` with any of them.
A request may also ask a registered model for another version or alias
(``?version=3``, ``?alias=challenger``); it is loaded like the others (least recently used out).

:class:`Served` is one loaded model on a replica: its current :class:`Loaded` version (swapped
by a follower on promotion), and a window of its last answers for ``/v1/models/{name}/stats``:
the share out of distribution and the mix of predicted labels, next to the label mix of the
validation split recorded in the bundle, flagged outside the band in :func:`drift_band`.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medcae.config import ConfigError
from medcae.registry.models import ModelRef
from medcae.serving.api import RequestError, model_id

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
STATS_WINDOW = 1000  # answers per model and replica that /stats summarises
MIN_STATS = 30  # fewer answers than this are reported, never flagged


@dataclass(frozen=True)
class Spec:
    """One configured model: the ``name`` in URLs and responses, and what it loads."""

    name: str
    ref: ModelRef

    @property
    def registered(self) -> bool:
        """Whether it lives in a registry (else it is a bundle folder: one version)."""
        return not self.ref.path


def parse_spec(text: str) -> tuple[str | None, ModelRef]:
    """``LABEL=REF`` or ``REF``: the label given (or None) and the reference."""
    label, sep, rest = text.partition("=")
    if sep and _LABEL.match(label.strip()):
        return label.strip(), ModelRef.parse(rest)
    return None, ModelRef.parse(text)


def build_specs(models: Sequence[str]) -> list[Spec]:
    """The configured models, in order (the first is the default).

    Raises:
        ConfigError: No model, a malformed reference, a bundle folder without a readable
            ``bundle.json``, or two models under one name.
    """
    if not models:
        raise ConfigError("no model to serve: give a bundle folder or NAME[@ALIAS|/VERSION]")
    specs: list[Spec] = []
    for text in models:
        label, ref = parse_spec(text)
        if ref.path and not label:
            meta_file = Path(ref.path) / "bundle.json"
            try:
                label = model_id(json.loads(meta_file.read_text("utf-8")))
            except (OSError, ValueError) as err:
                raise ConfigError(f"model {text!r}: cannot read {meta_file}: {err}") from err
        name = label or ref.name
        if any(s.name == name for s in specs):
            raise ConfigError(
                f"two models are named {name!r}; serve them under names of your own: "
                f"--model LABEL={text}"
            )
        specs.append(Spec(name, ref))
    return specs


def variant(spec: Spec, version: str | None, alias: str | None) -> tuple[str, ModelRef]:
    """The multiplexing key and reference of a request's ``?version=`` / ``?alias=``.

    Raises:
        RequestError: 404 when a bundle folder is asked for another version, or both are
            given, or either is malformed.
    """
    if version is None and alias is None:
        return spec.name, spec.ref
    if version is not None and alias is not None:
        raise RequestError(404, "unknown_version", "give a version or an alias, not both")
    if not spec.registered:
        raise RequestError(
            404,
            "unknown_version",
            f"model {spec.name!r} is a bundle folder with one version; it has no "
            f"{'version ' + str(version) if version is not None else 'alias ' + str(alias)}",
        )
    if version is not None:
        if not version.isdigit() or len(version) > 9:
            raise RequestError(404, "unknown_version", f"version {version[:20]!r}: not a number")
        v = str(int(version))
        return f"{spec.name}/{v}", ModelRef(name=spec.ref.name, version=v)
    assert alias is not None
    if not _ALIAS.match(alias):
        raise RequestError(404, "unknown_version", f"alias {alias[:40]!r}: not an alias name")
    return f"{spec.name}@{alias}", ModelRef(name=spec.ref.name, alias=alias)


def split_key(key: str) -> tuple[str, str | None, str | None]:
    """``(name, alias, version)`` of a multiplexing key made by :func:`variant` (names hold
    neither ``@`` nor ``/``)."""
    if "@" in key:
        name, alias = key.split("@", 1)
        return name, alias, None
    if "/" in key:
        name, version = key.split("/", 1)
        return name, None, version
    return key, None, None


def find(specs: Sequence[Spec], name: str) -> Spec:
    """The configured model named ``name``.

    Raises:
        RequestError: 404 ``unknown_model``, naming the models this server has.
    """
    for spec in specs:
        if spec.name == name:
            return spec
    raise RequestError(
        404,
        "unknown_model",
        f"no model {name[:80]!r} here; this server serves {', '.join(s.name for s in specs)}",
    )


def drift_band(expected: float, n: int, slack: float) -> float:
    """How far an observed share of ``n`` answers may sit from ``expected`` before it is
    flagged: three binomial standard errors plus ``slack`` (the model's own error)."""
    return 3.0 * math.sqrt(max(expected * (1.0 - expected), 1e-9) / n) + slack


class Served:
    """One model on one replica: its current version and a window of its last answers.

    Args:
        name: The name it is served under.
        key: Its multiplexing key (``name``, ``name@alias`` or ``name/version``).
        loaded: The version loaded now (:class:`medcae.serving.versions.Loaded`).
        window: How many recent answers ``stats`` summarises.
    """

    def __init__(self, name: str, key: str, loaded: Any, window: int = STATS_WINDOW):
        self.name, self.key, self.loaded = name, key, loaded
        self.follower: Any = None
        self._recent: deque[tuple[str, str, bool]] = deque(maxlen=window)
        self._lock = threading.Lock()

    def note(self, version: str, predictions: Sequence[dict[str, Any]]) -> None:
        """Remember answers (label and out-of-distribution flag) for ``stats``."""
        with self._lock:
            for p in predictions:
                self._recent.append((version, p["label"], not p["in_distribution"]))

    def stats(self) -> dict[str, Any]:
        """The last answers against the bundle's validation split: OOD share and label mix,
        each flagged when outside :func:`drift_band`. For a multi-label model, each finding's
        share of answers that have it against its share of validation images."""
        meta = self.loaded.predictor.meta
        with self._lock:
            recent = list(self._recent)
        n = len(recent)
        names = list(meta.get("label_names") or [])
        summary = meta.get("data_summary", {})
        val = summary.get("counts", {}).get("val", {}) or {}
        findings = meta.get("task") == "multilabel"
        total = (summary.get("totals", {}).get("val") if findings else None) or sum(val.values())
        expected = {k: val.get(k, 0) / (total or 1) for k in names}
        seen = Counter(
            part for _, label, _ in recent for part in (label.split("|") if findings else [label])
        )
        observed = {k: (seen[k] / n if n else 0.0) for k in names}
        ood_expected = 1.0 - float(meta.get("ood", {}).get("quantile", 0.99))
        ood_rate = sum(1 for *_, ood in recent if ood) / n if n else 0.0
        enough = n >= MIN_STATS
        labels = {
            k: {
                "observed": round(observed[k], 4),
                "expected": round(expected[k], 4),
                "band": round(drift_band(expected[k], max(n, 1), 0.10), 4),
                "flagged": enough
                and abs(observed[k] - expected[k]) > drift_band(expected[k], n, 0.10),
            }
            for k in names
        }
        ood_band = drift_band(ood_expected, max(n, 1), 0.02)
        ood_flag = enough and ood_rate > ood_expected + ood_band
        return {
            "model": self.name,
            "version": self.loaded.version,
            "answers": n,
            "window": self._recent.maxlen,
            "versions_in_window": sorted({v for v, *_ in recent}),
            "ood": {
                "observed": round(ood_rate, 4),
                "expected": round(ood_expected, 4),
                "band": round(ood_band, 4),
                "flagged": ood_flag,
            },
            "labels": labels,
            "flagged": ood_flag or any(v["flagged"] for v in labels.values()),
            "enough_answers": enough,
        }

    def __del__(self) -> None:  # Serve calls it when the model is evicted from the replica
        follower = getattr(self, "follower", None)
        if follower is not None:
            follower.stop.set()


def parse_pools(pools: Sequence[str] | str | None, specs: Sequence[Spec]) -> dict[str, str]:
    """``{served name: pool source}`` of ``NAME=PATH`` entries (a bare ``PATH``: the default
    model's), one pool per model.

    Raises:
        ConfigError: A name that is not served, or two pools for one model.
    """
    if isinstance(pools, str):
        pools = [p for p in pools.split(",") if p.strip()]
    out: dict[str, str] = {}
    for entry in pools or ():
        name, sep, source = entry.partition("=")
        if not sep or not _LABEL.match(name.strip()):
            name, source = specs[0].name, entry
        name, source = name.strip(), source.strip()
        if not source:
            raise ConfigError(
                f"pool {entry!r}: expected NAME=PATH (a folder, glob, CSV or Parquet)"
            )
        if not any(s.name == name for s in specs):
            served = ", ".join(s.name for s in specs)
            raise ConfigError(f"pool {entry!r}: no served model {name!r} (served: {served})")
        if name in out:
            raise ConfigError(f"pool {entry!r}: {name} already has the pool {out[name]}")
        out[name] = source
    return out
