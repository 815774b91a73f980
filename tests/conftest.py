"""Shared fixtures: one Ray instance per test session, tiny real data, the real data file."""

from __future__ import annotations

import os
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
