"""cluster.yaml: Ray's own launcher schema, the GPU worker type, the install, token auth on every
node, and start commands that Ray's `ray start` accepts. Offline, no Ray started."""

from __future__ import annotations

import copy
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

pytestmark = pytest.mark.timeout(120)

RAY_BIN = "~/medcae/.venv/bin/ray"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def config(raw) -> dict:
    """The config as `ray up` sees it: launcher defaults filled in, then validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


def _start_commands(config: dict, key: str) -> list[str]:
    return [c for c in config[key] if "ray start" in c]


def test_validates_against_ray_schema(config):
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(lambda c: c.update(unknown_key=1), id="unknown-top-level-key"),
        pytest.param(lambda c: c.update(max_workers="eight"), id="max-workers-not-int"),
        pytest.param(
            lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=100),
            id="min-workers-over-global-max",
        ),
        pytest.param(lambda c: c.pop("head_node_type"), id="no-head-type"),
    ],
)
def test_broken_copy_fails_validation(config, breakage):
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    broken = copy.deepcopy(config)
    breakage(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(broken)


def test_gpu_worker_type_and_cpu_head(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert (head["min_workers"], head["max_workers"]) == (0, 0)
    assert head["resources"].get("GPU", 0) == 0
    gpu = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu, "no worker type with GPU resources"
    for t in gpu.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"]
        assert t["max_workers"] >= 1


def test_setup_installs_with_make_venv_and_ships_the_token(config):
    for key in ("head_setup_commands", "worker_setup_commands"):  # merged with setup_commands
        assert any("make venv" in c for c in config[key]), key
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert config["file_mounts"]["~/medcae"] == "."
    assert {".venv", ".git"} <= set(config["rsync_exclude"])


def test_every_ray_start_exports_token_mode(config):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = _start_commands(config, key)
        assert len(starts) == 1, key
        before_start = starts[0].split("ray start")[0]
        # `export`: a bare `RAY_AUTH_MODE=token ulimit ...` prefix would not reach `ray start`.
        assert "export RAY_AUTH_MODE=token;" in before_start, key
        assert RAY_BIN + " start" in starts[0], "must use the project's venv"


def test_the_head_tells_jobs_an_autoscaler_may_add_nodes(config):
    """medcae.distributed.runtime waits MEDCAE_PLACEMENT_TIMEOUT_S for nodes only where
    RAY_AUTOSCALER is set; the launcher's head, where the jobs' drivers run, sets it."""
    head = _start_commands(config, "head_start_ray_commands")[0]
    assert "export RAY_AUTOSCALER=1;" in head.split("ray start")[0]
    assert config["max_workers"] > 0  # there is something to scale


def _run_start_command(command: str, tmp_path: Path) -> tuple[list[str], str]:
    """Run a start command in bash with a fake ``ray`` that records its argv and auth mode."""
    home = tmp_path / "home"
    fake = home / "medcae" / ".venv" / "bin" / "ray"
    fake.parent.mkdir(parents=True, exist_ok=True)
    record = tmp_path / "record"
    fake.write_text(
        f'#!/bin/sh\necho "$RAY_AUTH_MODE" > {record}\nprintf "%s\\n" "$@" >> {record}\n'
    )
    fake.chmod(0o755)
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "RAY_HEAD_IP": "10.0.0.1"}
    subprocess.run(["bash", "-c", command], env=env, check=True, timeout=30)
    mode, *argv = record.read_text().splitlines()
    return argv, mode


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_start_commands_parse_as_ray_start(config, key, tmp_path):
    """Each start command, run by bash, hands `ray start` token mode and flags that Ray's own
    `ray start` parser accepts; workers get none of the head-only flags (Ray aborts on those)."""
    from ray.scripts.scripts import start

    (command,) = _start_commands(config, key)
    argv, mode = _run_start_command(command, tmp_path)
    assert mode == "token"
    assert argv[0] == "start"
    params = start.make_context("start", argv[1:]).params
    if key == "head_start_ray_commands":
        assert params["head"] and params["include_dashboard"] is True
        assert params["port"] == 6379 and params["dashboard_port"] == 8265
        # The dashboard accepts job submissions: loopback only, reached by `ray dashboard`.
        assert params["dashboard_host"] == "127.0.0.1"
    else:
        assert not params["head"]
        assert params["address"] == "10.0.0.1:6379"
        head_only = ("port", "include_dashboard", "redis_shard_ports")  # as Ray checks them
        assert all(params[k] is None for k in head_only), shlex.join(argv)
