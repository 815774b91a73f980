"""The main job: data -> Ray Data backbone stage (cached) -> Ray Train CAE -> classifier."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medcae.backbones import get_spec
from medcae.cache import FeatureCache, cache_key
from medcae.config import PipelineConfig
from medcae.data import SPLITS, Dataset, ImageSet, load_dataset, load_unlabeled
from medcae.distributed.extract import extract_with_ray
from medcae.distributed.train import train_cae
from medcae.engine import build_cae, channel_stats, embed_all
from medcae.evaluation import fit_and_test, save_model
from medcae.features import FeatureExtractor
from medcae.metrics import format_results

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    """What one run produced."""

    bundle: Path
    reports: dict[str, dict[str, Any]]
    table: str
    cache_hits: dict[str, bool]
    timings: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def smoke_config(cfg: PipelineConfig) -> PipelineConfig:
    """Shrink a config to seconds: low resolution, small CAE, two epochs."""
    return replace(
        cfg,
        backbone=replace(cfg.backbone, resolution=64),
        cae=replace(cfg.cae, channels=(32,), latent_channels=8, epochs=2),
    )


def subsample(ds: Dataset, per_split: dict[str, int], seed: int = 0) -> Dataset:
    """Keep the first ``per_split[s]`` images of each split (after a seeded shuffle)."""
    rng = np.random.default_rng(seed)
    splits = {}
    for s, part in ds.splits.items():
        idx = np.sort(rng.permutation(len(part))[: per_split.get(s, len(part))])
        splits[s] = ImageSet(part.images[idx], None if part.labels is None else part.labels[idx])
    return Dataset(ds.name, splits, ds.label_names, ds.skipped)


def _fingerprint(images: np.ndarray) -> str:
    h = hashlib.sha1(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


def resolved_backbone(cfg: PipelineConfig) -> PipelineConfig:
    """Fill in the backbone's default tap so the config names exactly what was used."""
    if cfg.backbone.taps:
        return cfg
    return replace(
        cfg, backbone=replace(cfg.backbone, taps=(get_spec(cfg.backbone.name).default_tap,))
    )


def features_key(fingerprint: str, cfg: PipelineConfig) -> str:
    """Cache key of the backbone features of one image set under ``cfg.backbone``."""
    return cache_key({"images": fingerprint}, cfg.to_dict()["backbone"])


def cached_features(
    parts: dict[str, ImageSet], fingerprint: str, cfg: PipelineConfig, cache: FeatureCache
) -> tuple[dict[str, dict[str, np.ndarray]], bool]:
    """Backbone features of ``parts``, from the cache or extracted through Ray Data.

    Returns:
        ``({part: {"maps", "final", "labels"?}}, cache_hit)``.
    """
    key = features_key(fingerprint, cfg)
    hit = cache.load(key)
    if hit is not None and set(hit) >= set(parts):
        log.info("feature cache hit: %s", cache.path(key))
        return hit, True
    log.info("feature cache miss: extracting %s with %s", list(parts), cfg.backbone.name)
    FeatureExtractor(cfg.backbone)  # fail here, with a clear message, not inside an actor
    names = list(parts)
    images = np.concatenate([parts[p].images for p in names])  # one pass, one actor pool
    feats = extract_with_ray(
        images,
        cfg.backbone,
        cfg.train.extract_batch_size,
        cfg.train.extract_actors,
        cfg.train.use_gpu,
        cfg.train.extract_threads,
        label="+".join(names),
    )
    bounds = np.cumsum([0] + [len(parts[p]) for p in names])
    out = {}
    for name, lo, hi in zip(names, bounds[:-1], bounds[1:]):
        labels = parts[name].labels
        out[name] = {k: v[lo:hi] for k, v in feats.items()}
        out[name] |= {"labels": labels} if labels is not None else {}
    cache.save(key, out, {"backbone": cfg.to_dict()["backbone"], "fingerprint": fingerprint})
    return cache.load(key), False  # type: ignore[return-value]


def run_pipeline(
    cfg: PipelineConfig,
    out_dir: str | Path,
    cache_dir: str | Path | None = None,
    smoke_test: bool = False,
    data_dir: str | None = None,
    dataset: Dataset | None = None,
    run_name: str | None = None,
) -> PipelineResult:
    """Run the whole method once and write a bundle under ``out_dir``.

    Args:
        cfg: Pipeline configuration.
        out_dir: Output folder (bundle, checkpoints, results.json).
        cache_dir: Feature cache folder (default ``~/.cache/medcae/features``).
        smoke_test: Subsample the data and shrink the model so the run takes seconds.
        data_dir: Where named data sets are looked up.
        dataset: ``cfg.data`` already loaded (the CLI loads it before starting Ray, so bad
            input fails fast).
        run_name: Ray Train run name under ``out_dir/checkpoints``; the same name resumes.
    """
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    cfg = resolved_backbone(smoke_config(cfg) if smoke_test else cfg)
    ds = dataset or load_dataset(cfg.data, data_dir)
    if smoke_test:
        ds = subsample(ds, {"train": 96, "val": 48, "test": 48})
    cache = FeatureCache(cache_dir)
    feats, hit = cached_features(ds.splits, ds.fingerprint(), cfg, cache)
    hits = {"labeled": hit}
    unl_maps = feats["train"]["maps"]
    skipped = list(ds.skipped)
    if cfg.unlabeled:
        unl, unl_skipped = load_unlabeled(cfg.unlabeled, data_dir=data_dir)
        skipped += unl_skipped
        unl_feats, hits["unlabeled"] = cached_features(
            {"unlabeled": unl}, _fingerprint(unl.images), cfg, cache
        )
        unl_maps = unl_feats["unlabeled"]["maps"]
    t["features_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    mean, std = channel_stats(unl_maps)
    outcome = train_cae(
        unl_maps,
        feats["val"]["maps"],
        cfg.cae,
        cfg.train,
        mean,
        std,
        out_dir / "checkpoints",
        name=run_name or f"cae-{int(time.time())}",
    )
    state, history = outcome.state, outcome.history
    t["train_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    cae = build_cae(unl_maps.shape[1], cfg.cae, mean, std)
    cae.load_state_dict(state)
    labels = {s: np.asarray(feats[s]["labels"]) for s in SPLITS}
    codes = {s: embed_all(cae, feats[s]["maps"]) for s in SPLITS}
    finals = {s: np.asarray(feats[s]["final"]) for s in SPLITS}
    frozen = fit_and_test(cfg.classifier, finals, labels, ds.label_names)
    ours = fit_and_test(cfg.classifier, codes, labels, ds.label_names)
    reports = {
        f"frozen {cfg.backbone.name} final + {cfg.classifier.kind}": frozen.test,
        f"CAE on {'+'.join(cfg.backbone.taps)} + {cfg.classifier.kind}": ours.test,
    }
    t["classifier_s"] = time.perf_counter() - t2

    extra = {
        "baseline_frozen_test": frozen.test,
        "cae_history": history,
        "num_train_unlabeled": int(len(unl_maps)),
    }
    bundle = save_model(
        out_dir / "bundle",
        cfg,
        ds.name,
        ds.label_names,
        cae,
        ours,
        np.asarray(feats["val"]["maps"]),
        extra,
    )
    t["total_s"] = time.perf_counter() - t0
    table = format_results(reports, ds.label_names)
    result = PipelineResult(bundle, reports, table, hits, t, history, skipped)
    (out_dir / "results.json").write_text(
        json.dumps(
            {
                "reports": reports,
                "cache_hits": hits,
                "timings": t,
                "bundle": str(bundle),
                "skipped": skipped,
                "config": cfg.to_dict(),
            },
            indent=2,
            default=float,
        )
    )
    return result
