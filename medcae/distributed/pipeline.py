"""The main job, one road at every scale.

rows (names only) -> feature store (Ray Data decode + backbone actor pool -> Parquet)
-> Ray Train CAE (streamed or held shards) -> Ray Data embed stage -> classifier -> bundle.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from medcae.config import SMOKE_ROWS, CAEConfig, PipelineConfig
from medcae.data import Rows, list_rows, list_unlabeled_rows
from medcae.distributed.runtime import progress_log
from medcae.distributed.store import ExtractOptions, FeatureStore, build_store
from medcae.distributed.train import StreamedSplits, TrainOutcome, train_cae
from medcae.evaluation.export import save_model
from medcae.evaluation.protocol import describe, fit_representations
from medcae.metrics.classification import format_findings, format_results
from medcae.model.backbones import get_spec
from medcae.model.cae import ConvAutoEncoder
from medcae.model.representations import tap_pool

log = logging.getLogger(__name__)

LABELED = ("train", "val", "test")


@dataclass(frozen=True)
class RunPaths:
    """Where a run reads and writes.

    Attributes:
        out: Run folder: ``bundle/``, ``results.json``, ``test_predictions.parquet``, the log.
        store_root: Feature-store root shared by runs (entries are keyed by content).
        storage_path: Ray Train storage (local, NFS or pyarrow URI); checkpoints go to
            ``<storage_path>/<name>``, and the same pair resumes a run.
        name: Run name under ``storage_path``.
        materialize: ``auto``/``always``/``never``: hold the maps in the object store.
    """

    out: Path
    store_root: str
    storage_path: str
    name: str
    materialize: str = "auto"


@dataclass
class PipelineResult:
    """What one run produced."""

    bundle: Path
    reports: dict[str, dict[str, Any]]
    table: str
    store: FeatureStore
    training: TrainOutcome
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def history(self) -> list[dict[str, Any]]:
        """Per-epoch CAE metrics."""
        return self.training.history

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """Files that could not be read or decoded."""
        return self.store.skipped


def smoke_config(cfg: PipelineConfig) -> PipelineConfig:
    """Shrink a config to seconds: low resolution, small CAE, two epochs."""
    return replace(
        cfg,
        backbone=replace(cfg.backbone, resolution=64),
        cae=replace(cfg.cae, channels=(32,), latent_channels=8, epochs=2),
    )


def resolved_backbone(cfg: PipelineConfig) -> PipelineConfig:
    """Fill in the backbone's default tap so the config names exactly what was used."""
    if cfg.backbone.taps:
        return cfg
    return replace(
        cfg, backbone=replace(cfg.backbone, taps=(get_spec(cfg.backbone.name).default_tap,))
    )


def subsample_rows(rows: Rows, per_split: dict[str, int], seed: int = 0) -> Rows:
    """Keep at most ``per_split[s]`` rows of each split (a seeded choice, in listing order)."""
    rng = np.random.default_rng(seed)
    splits = np.asarray(rows.table.column("split").to_pylist())
    keep = []
    for s in np.unique(splits):
        idx = np.flatnonzero(splits == s)
        keep += sorted(rng.permutation(idx)[: per_split.get(str(s), len(idx))].tolist())
    return replace(rows, table=rows.table.take(pa.array(sorted(keep), pa.int64())))


def list_sources(cfg: PipelineConfig, data_dir: str | None, smoke_test: bool) -> list[Rows]:
    """The labeled listing (and the unlabeled pool's), without Ray: bad input fails here."""
    sources = [
        list_rows(
            cfg.data,
            data_dir,
            seed=cfg.classifier.seed,
            label_columns=cfg.label_columns,
            no_finding=cfg.no_finding,
        )
    ]
    if cfg.unlabeled:
        sources.append(list_unlabeled_rows(cfg.unlabeled, data_dir))
    if smoke_test:
        sources = [subsample_rows(r, SMOKE_ROWS) for r in sources]
        if sources[0].multilabel:  # the smaller splits must still hold every finding
            from medcae.data.findings import check_splits

            table = sources[0].table
            labels, splits = table.column("label").to_numpy(), table.column("split").to_pylist()
            check_splits(labels, splits, sources[0].label_names, f"{cfg.data} (--smoke-test)")
    return sources


# --------------------------------------------------------------------------- embed stage


class CAEStage:
    """Ray Data callable class: the trained CAE's codes and reconstruction error per map.

    Args:
        state: The CAE ``state_dict``.
        cae: ``CAEConfig`` as a dict.
        in_channels: ``C`` of the maps.
    """

    def __init__(self, state: dict[str, torch.Tensor], cae: dict, in_channels: int):
        cfg = CAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cae.items()})
        self.model = ConvAutoEncoder(in_channels, cfg)
        self.model.load_state_dict(state)
        self.model.eval()

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(batch["maps"], dtype=np.float32))
        out = {k: v for k, v in batch.items() if k != "maps"}
        out["codes"] = self.model.embed(x).numpy()
        out["tap"] = tap_pool(batch["maps"])
        out["error"] = self.model.reconstruction_error(x).numpy()
        return out


def embed_splits(
    store: FeatureStore,
    state: dict[str, torch.Tensor],
    cae: CAEConfig,
    splits: tuple[str, ...] = LABELED,
    actors: int = 1,
) -> dict[str, dict[str, np.ndarray]]:
    """Codes, errors, pooled final features and labels of ``splits``, each sorted by ``id``.

    Returns:
        ``{split: {"id", "label", "codes" (N, D), "tap" (N, 2C), "error" (N,),
        "final" (N, C_final)}}``.
    """
    ds = store.split(*splits, columns=("id", "split", "label", "maps", "final"))
    ds = ds.map_batches(
        CAEStage,
        fn_constructor_kwargs={
            "state": state,
            "cae": json.loads(json.dumps(cae.__dict__, default=list)),
            "in_channels": store.shape[0],
        },
        batch_size=256,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
        batch_format="numpy",
    )
    parts: dict[str, list[dict[str, np.ndarray]]] = {s: [] for s in splits}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        names = batch.pop("split").astype(str)
        for s in np.unique(names):
            parts[str(s)].append({k: v[names == s] for k, v in batch.items()})
    out = {}
    for s, chunks in parts.items():
        if not chunks:
            out[s] = {}
            continue
        joined = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        order = np.argsort(joined["id"].astype(str), kind="stable")
        out[s] = {k: v[order] for k, v in joined.items()}
    return out


# --------------------------------------------------------------------------- the run


def run_pipeline(
    cfg: PipelineConfig,
    paths: RunPaths,
    sources: list[Rows],
    extract: ExtractOptions | None = None,
) -> PipelineResult:
    """Run the whole method once; every run ends in a bundle under ``paths.out``.

    Args:
        cfg: Pipeline configuration (backbone taps resolved).
        paths: Output folder, store root, Train storage and run name.
        sources: From :func:`list_sources` (validated before Ray started).
        extract: Backbone stage options.
    """
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    store = build_store(sources, cfg.backbone, paths.store_root, extract)
    t["features_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    hold = store.should_materialize(paths.materialize)
    progress_log.info(
        "CAE: %d maps %s, %d epochs, %d worker(s)",
        store.count("train", "unlabeled"),
        "held in the object store" if hold else "streamed from storage",
        cfg.cae.epochs,
        cfg.train.num_workers,
    )
    if hold:
        train_src, val_src = (
            store.split("train", "unlabeled", materialize=True),
            store.split("val", materialize=True),
        )
    else:
        train_src = StreamedSplits(store.files("train", "unlabeled"))
        val_src = StreamedSplits(store.files("val"))
    training = train_cae(
        train_src,
        val_src,
        cfg.cae,
        cfg.train,
        store.mean,
        store.std,
        paths.storage_path,
        paths.name,
        in_channels=store.shape[0],
        fingerprint=store.key,
    )
    t["train_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    emb = embed_splits(store, training.state, cfg.cae)
    _require_labeled(emb, store)
    labels = {s: emb[s]["label"] for s in LABELED}
    multilabel = sources[0].multilabel
    fitted, choice = fit_representations(cfg.classifier, emb, labels, store.label_names, multilabel)
    ours, frozen = fitted[choice.name], fitted["frozen_final"]
    cfg = replace(cfg, classifier=replace(cfg.classifier, representation=choice.name))
    progress_log.info("representation: %s", choice.reason)
    taps = "+".join(cfg.backbone.taps)
    reports = {
        describe(name, cfg.backbone.name, taps, cfg.classifier.kind)
        + (" (chosen)" if name == choice.name else ""): ev.test
        for name, ev in fitted.items()
    }
    t["classifier_s"] = time.perf_counter() - t2
    progress_log.info("classifier: %s, %.1fs", ours.selection, t["classifier_s"])
    for line in decision_lines(ours, store.label_names):
        progress_log.info("%s", line)

    model = ConvAutoEncoder(store.shape[0], cfg.cae)
    model.load_state_dict(training.state)
    extra = {
        "baseline_frozen_test": frozen.test,
        "representations_test": {name: ev.test for name, ev in fitted.items()},
        "cae_history": training.history,
        "num_train_unlabeled": store.count("train", "unlabeled"),
        "feature_store": {"uri": store.uri, "key": store.key, "rows": store.rows},
        "features_runtime": store.runtime,
    }
    bundle = save_model(
        paths.out / "bundle",
        cfg,
        sources[0].name,
        store.label_names,
        model,
        ours,
        emb["val"]["error"],
        extra,
        labels=labels,
        unlabeled=store.count("unlabeled"),
        representation=choice.to_dict(),
        multilabel=multilabel,
    )
    progress_log.info("bundle: %s", bundle)
    _write_predictions(
        paths.out / "test_predictions.parquet", emb["test"], ours.test_proba, store.label_names
    )
    t["total_s"] = time.perf_counter() - t0
    table = format_results(reports, store.label_names)
    if multilabel:
        table += "\n\n" + format_findings(ours.test, store.label_names)
    result = PipelineResult(bundle, reports, table, store, training, t)
    _write_results(paths.out / "results.json", result, cfg)
    return result


def decision_lines(ev: Any, names: list[str]) -> list[str]:
    """The console's lines on how the chosen head decides: its calibration and operating
    point (per finding for findings), and any target validation could not meet exactly."""
    findings = isinstance(ev.operating_point, list)
    cals = ev.calibration if isinstance(ev.calibration, list) else [ev.calibration]
    ops = ev.operating_point if findings else [ev.operating_point]
    lines = []
    for i, (cal, op) in enumerate(zip(cals, ops)):
        if cal is None or op is None:
            continue
        who = f"{names[i]}: " if findings else ""
        if op.threshold is None:
            point = f"{op.text}: the most probable class"
        else:
            pos = names[i] if findings else names[1 if op.positive is None else op.positive]
            val = op.val or {}
            point = (
                f"{op.text}: p({pos}) >= {op.threshold:.4f} (val sensitivity "
                f"{val.get('sensitivity', float('nan')):.3f}, specificity "
                f"{val.get('specificity', float('nan')):.3f})"
            )
        lines.append(f"{who}calibration {cal.reason}")
        lines.append(f"{who}operating point {point}")
        if op.note:
            lines.append(f"{who}note: {op.note}")
    return lines


def _require_labeled(emb: dict[str, dict[str, np.ndarray]], store: FeatureStore) -> None:
    from medcae.data import DataError

    empty = [s for s in LABELED if not len(emb[s].get("id", []))]
    if empty:
        raise DataError(
            f"no decodable labeled images in split(s) {empty} of the feature store "
            f"{store.uri} (rows: {store.rows}); every split needs at least one image"
        )


def _write_predictions(
    path: Path, test: dict[str, np.ndarray], proba: np.ndarray, names: list[str]
) -> None:
    """The run's own test-set predictions: id, label, one probability column per class."""
    cols = {
        "id": test["id"].astype(str),
        "label": test["label"],
        **{f"p_{n}": proba[:, i] for i, n in enumerate(names)},
    }
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.table(cols), tmp)
    tmp.replace(path)


def _write_results(path: Path, res: PipelineResult, cfg: PipelineConfig) -> None:
    body = {
        "reports": res.reports,
        "timings": res.timings,
        "bundle": str(res.bundle),
        "feature_store": {
            "uri": res.store.uri,
            "key": res.store.key,
            "reused": res.store.reused,
            "rows": res.store.rows,
        },
        "checkpoint": res.training.checkpoint,
        "restored_from_epoch": res.training.restored_from,
        "worker_nodes": res.training.worker_nodes,
        "history": res.training.history,
        "skipped": res.store.skipped,
        "config": cfg.to_dict(),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, indent=2, default=float))
    tmp.replace(path)
