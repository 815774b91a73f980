"""Shared fixtures: one Ray instance per test session, tiny real data, the real data file, a
real bundle and the Serve app that serves it; markers for every test that starts Ray.

This file sits at the root of ``tests/`` so that pytest (import mode "prepend") puts that folder
on ``sys.path``: ``import helpers`` then works from every test folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

pytest.register_assert_rewrite("helpers")  # before its first import: its asserts explain themselves

from helpers import (  # noqa: E402
    API_KEY,
    LIMITS,
    ORIGIN,
    ROOT,
    start_serve,
)

from medcae.config import BackboneConfig  # noqa: E402


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    """Every test that uses ``ray_session`` (directly or through another fixture) is a ``ray``
    test, and every test of the running Serve app (``server``) a ``serve`` and ``ray`` test,
    so ``-m "not ray"`` deselects everything that starts Ray."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if "server" in fixtures:
            item.add_marker(pytest.mark.serve)
            item.add_marker(pytest.mark.ray)
        elif "ray_session" in fixtures:
            item.add_marker(pytest.mark.ray)
    # The longest files first: run in parallel (`make test` uses pytest-xdist, one file per
    # worker at a time), they start early instead of making the tail. A file's weight is its
    # measured seconds where known (LONG_FILES), else 20 s per slow test. Stable: the order
    # inside a file, and among equals, is kept.
    weight: dict = {}
    for item in items:
        w = 20.0 if item.get_closest_marker("slow") else 0.0
        weight[item.path] = weight.get(item.path, 0.0) + w
    for path in weight:
        weight[path] = LONG_FILES.get(path.name, weight[path])
    items.sort(key=lambda item: -weight[item.path])


#: Seconds per file under `make test`, measured 2026-12-04 (three workers, two cores): a hint for
#: the order above only; a file missing here is weighed by its slow tests.
LONG_FILES = {
    "test_train_recovery.py": 170,
    "test_train_resume.py": 170,
    "test_train_equivalence.py": 215,
    "test_realdata.py": 185,
    "test_tune.py": 175,
    "test_pipeline.py": 150,
    "test_multinode.py": 230,
    "test_labeling_api.py": 90,
    "test_serve.py": 140,
    "test_cli.py": 125,
    "test_store.py": 125,
    "test_evaluate.py": 100,
    "test_finetune.py": 85,
    "test_slurm.py": 65,
}


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
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
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
    return core_bundle(tmp_path_factory.mktemp("bundle") / "bundle", demo_npz)


@pytest.fixture(scope="session")
def findings_npz(tmp_path_factory) -> Path:
    """The demo's multi-label variant (nodule, ring, effusion), generated once per session."""
    from medcae.data.demo import make_findings_dataset

    return make_findings_dataset(tmp_path_factory.mktemp("findings") / "findings.npz", seed=0)


@pytest.fixture(scope="session")
def findings_bundle(tmp_path_factory, findings_npz) -> BundleCase:
    """:func:`demo_bundle` of the demo's multi-label variant (three findings per image)."""
    return core_bundle(tmp_path_factory.mktemp("fbundle") / "bundle", findings_npz)


def core_bundle(dest: Path, npz: Path) -> BundleCase:
    """A bundle of ``npz`` built with the Ray-free core (train 240, val 80, test 80)."""
    import torch

    from medcae.config import CAEConfig, ClassifierConfig, PipelineConfig
    from medcae.data import load_dataset
    from medcae.evaluation.export import save_model
    from medcae.evaluation.protocol import fit_and_test
    from medcae.model.epoch import build_cae, channel_stats, embed_all, errors_all
    from medcae.model.features import FeatureExtractor
    from medcae.model.trainer import fit_cae

    cfg = PipelineConfig(
        data=str(npz),
        backbone=BackboneConfig(taps=("stage4",), resolution=64),
        cae=CAEConfig(channels=(32,), latent_channels=8),
        classifier=ClassifierConfig(C_grid=(0.1, 1.0)),
    )
    ds = load_dataset(str(npz))
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
    fitted = fit_and_test(cfg.classifier, codes, labels, ds.label_names, ds.multilabel)
    path = save_model(
        dest,
        cfg,
        ds.name,
        ds.label_names,
        cae,
        fitted,
        errors_all(cae, maps["val"]),
        labels=labels,
        multilabel=ds.multilabel,
    )
    return BundleCase(
        path,
        ds.splits["test"].images[: n["test"]],
        labels["test"],
        fitted.head.predict_proba(codes["test"]),
    )


@pytest.fixture(scope="module")
def server(ray_session, demo_bundle):
    """The Serve app of ``demo_bundle`` on a free loopback port, in the session's Ray, with the
    limits, key and allowed origin of ``helpers`` (LIMITS, API_KEY, ORIGIN); an ``httpx``
    client that sends the key. One per test module."""
    import httpx
    from ray import serve

    from medcae.serving.app import build_app
    from medcae.serving.auth import hash_key

    args = {
        "bundle": str(demo_bundle.path),
        "max_batch_size": 8,
        "limits": LIMITS,
        "cors_origins": [ORIGIN],
    }
    port = start_serve(build_app(args | {"api_key_sha256": hash_key(API_KEY)}))
    client = httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        timeout=60,
        headers={"Authorization": f"Bearer {API_KEY}"},  # every test through it sends the key
    )
    yield client
    client.close()
    serve.shutdown()
