"""Fixtures of the distributed tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def run_dir(tmp_path_factory, request) -> Path:
    """A run folder beside the shared feature store."""
    d = tmp_path_factory.getbasetemp() / "train-jobs" / request.node.name[:40]
    d.mkdir(parents=True)
    return d
