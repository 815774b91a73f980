"""Shared fixtures: one Ray instance per test session, tiny real data, the real data file."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from medcae.config import BackboneConfig


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (Ray starts slowly on 2 cores).

    Declares 4 logical CPUs on this 2-core machine so Train workers never starve Ray Data.
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parents[1])}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """``$MEDCAE_DATA_DIR`` holding pneumoniamnist.npz, else skip."""
    d = os.environ.get("MEDCAE_DATA_DIR")
    if not d or not (Path(d) / "pneumoniamnist.npz").is_file():
        pytest.skip("MEDCAE_DATA_DIR with pneumoniamnist.npz not set")
    return Path(d)


@pytest.fixture(scope="session")
def demo_npz(tmp_path_factory) -> Path:
    """The built-in demo data set, generated once per session."""
    from medcae.data import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "demo.npz", seed=0)


@pytest.fixture(scope="session")
def tiny_backbone() -> BackboneConfig:
    """The real default backbone (ImageNet weights) at a small resolution."""
    return BackboneConfig(name="efficientnet_lite0", taps=("stage4",), resolution=64)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@dataclass
class BundleCase:
    """A real bundle built with the core (no Ray) and what it should predict."""

    path: Path
    test_images: np.ndarray
    test_labels: np.ndarray
    expected_proba: np.ndarray


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory, demo_npz) -> BundleCase:
    """Real backbone (64 px), a small CAE trained for a few epochs, a fitted head, real OOD
    threshold; built with the Ray-free core in a few seconds."""
    import torch

    from medcae.config import CAEConfig, ClassifierConfig, PipelineConfig
    from medcae.data import load_dataset
    from medcae.evaluation.export import save_model
    from medcae.evaluation.protocol import fit_and_test
    from medcae.model.epoch import build_cae, channel_stats, embed_all, errors_all
    from medcae.model.features import FeatureExtractor
    from medcae.model.trainer import fit_cae

    cfg = PipelineConfig(
        data=str(demo_npz),
        backbone=BackboneConfig(taps=("stage4",), resolution=64),
        cae=CAEConfig(channels=(32,), latent_channels=8),
        classifier=ClassifierConfig(C_grid=(0.1, 1.0)),
    )
    ds = load_dataset(str(demo_npz))
    n = {"train": 240, "val": 80, "test": 80}
    ext = FeatureExtractor(cfg.backbone)
    maps = {s: ext(ds.splits[s].images[:k])["maps"] for s, k in n.items()}
    labels = {s: ds.splits[s].labels[:k] for s, k in n.items()}
    cae_cfg = replace(cfg.cae, epochs=6, lr=3e-3, batch_size=32)
    cae = build_cae(maps["train"].shape[1], cae_cfg, *channel_stats(maps["train"]))
    x = torch.from_numpy(maps["train"]).float()
    batches = [{"maps": x[i : i + 32]} for i in range(0, len(x), 32)]
    fit_cae(cae, cae_cfg, lambda epoch: batches, in_channels=x.shape[1])
    codes = {s: embed_all(cae, m) for s, m in maps.items()}
    fitted = fit_and_test(cfg.classifier, codes, labels, ds.label_names)
    path = save_model(
        tmp_path_factory.mktemp("bundle") / "bundle",
        cfg,
        ds.name,
        ds.label_names,
        cae,
        fitted,
        errors_all(cae, maps["val"]),
        labels=labels,
    )
    return BundleCase(
        path,
        ds.splits["test"].images[: n["test"]],
        labels["test"],
        fitted.head.predict_proba(codes["test"]),
    )
