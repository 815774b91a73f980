"""Requests that fit the cluster: a stage no node can hold fails fast, naming the resource."""

from __future__ import annotations

import time

import pytest

from medcae.distributed.runtime import (
    PLACEMENT_TIMEOUT_ENV,
    PlacementError,
    _shortfall,
    require_placeable,
    stage_threads,
)

NODES = [{"CPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]


@pytest.mark.parametrize(
    "request_, count, short",
    [
        ({"CPU": 1.0}, 2, None),
        ({"CPU": 1.0}, 3, "CPU"),
        ({"CPU": 2.0}, 1, "CPU"),  # 2 CPUs in the cluster, but not on one node
        ({"GPU": 1.0, "CPU": 1.0}, 1, None),
        ({"GPU": 1.0, "CPU": 1.0}, 2, "GPU"),
        ({"CPU": 0.5}, 4, None),
    ],
)
def test_shortfall_per_node(request_, count, short):
    got = _shortfall(request_, NODES, count)
    assert (got[0] if got else None) == short


@pytest.mark.ray
def test_unplaceable_stage_fails_at_once_with_the_resource_named(ray_session):
    cpus = ray_session.cluster_resources()["CPU"]
    t0 = time.monotonic()
    with pytest.raises(PlacementError, match=r"needs 64 CPU on one node .* offers \d+ CPU"):
        require_placeable({"CPU": 64.0}, "backbone actor", timeout_s=0)
    assert time.monotonic() - t0 < 60  # at once: not the 300 s an autoscaling cluster waits
    require_placeable({"CPU": cpus}, "backbone actor", timeout_s=0)  # fits: returns
    assert 1 <= stage_threads(1) <= cpus and stage_threads(64) == 1


@pytest.mark.ray
def test_where_an_autoscaler_may_add_nodes_it_waits_the_placement_timeout(ray_session, monkeypatch):
    """RAY_AUTOSCALER (set by cluster.yaml's head) makes the check wait for nodes, for
    MEDCAE_PLACEMENT_TIMEOUT_S; without either it fails at once (a local or Slurm Ray)."""
    monkeypatch.delenv("KUBERAY_GEN_RAY_START_CMD", raising=False)
    monkeypatch.delenv("RAY_AUTOSCALER", raising=False)
    monkeypatch.delenv(PLACEMENT_TIMEOUT_ENV, raising=False)
    t0 = time.monotonic()
    with pytest.raises(PlacementError):
        require_placeable({"CPU": 64.0}, "backbone actor")
    at_once = time.monotonic() - t0
    monkeypatch.setenv("RAY_AUTOSCALER", "1")
    monkeypatch.setenv(PLACEMENT_TIMEOUT_ENV, "3")
    t0 = time.monotonic()
    with pytest.raises(PlacementError, match="needs 64 CPU"):
        require_placeable({"CPU": 64.0}, "backbone actor")
    waited = time.monotonic() - t0
    assert waited >= 3.0 > at_once, (waited, at_once)
