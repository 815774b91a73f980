"""hpc/medcae.sbatch on this machine as if it had two Slurm nodes.

Fake ``srun`` and ``scontrol`` on PATH: ``scontrol show hostnames`` names two nodes, ``srun``
logs its call, drops its Slurm options and runs the command here, so the script starts two
real Ray nodes (head and worker) and runs an entry point against them.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT
from helpers.cluster import node_env, port_free, wait_gone

SCRIPT = ROOT / "hpc" / "medcae.sbatch"

FAKE_SRUN = """\
#!/usr/bin/env bash
# Fake srun: log the call, drop the Slurm options, run the command on this machine.
echo "srun $*" >> "$FAKE_SLURM_LOG"
while (($#)); do
  case "$1" in
    -w|-N|-n|-c|--nodelist|--nodes|--ntasks|--cpus-per-task) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
if [ -n "${FAKE_SLURM_BROKEN:-}" ] && [[ " $* " == *" --address="* ]]; then
  echo "fake srun: worker node broken" >&2
  exit 1
fi
exec "$@"
"""

FAKE_SCONTROL = """\
#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] || { echo "fake scontrol: unsupported: $*" >&2; exit 2; }
printf '%s\\n' fake-node-1 fake-node-2
"""

# Proves the cluster had two nodes: one task pinned to each alive node.
ENTRY = """\
import json, sys
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init()  # address from RAY_ADDRESS, token from RAY_AUTH_TOKEN
alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]

@ray.remote(num_cpus=1)
def where():
    return ray.get_runtime_context().get_node_id()

pinned = [NodeAffinitySchedulingStrategy(n, soft=False) for n in alive]
ran_on = ray.get([where.options(scheduling_strategy=s).remote() for s in pinned])
print("SLURM_TEST_RESULT", json.dumps({"alive": alive, "ran_on": ran_on, "args": sys.argv[1:]}))
"""


def print_config(job_id: int, **env: str) -> dict[str, str]:
    """The script's derived settings for ``job_id`` (MEDCAE_PRINT_CONFIG=1: starts nothing)."""
    out = subprocess.run(
        ["bash", str(SCRIPT)],
        env={**node_env(), "SLURM_JOB_ID": str(job_id), "MEDCAE_PRINT_CONFIG": "1", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def _ports(cfg: dict[str, str]) -> set[int]:
    single = {int(v) for k, v in cfg.items() if k.endswith("_port")}
    return single | set(range(int(cfg["min_worker_port"]), int(cfg["max_worker_port"]) + 1))


@pytest.mark.timeout(60)
def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(SCRIPT)], check=True, timeout=60)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ids", [(1001, 1002), (7, 8), (123456, 123457)])
def test_jobs_get_disjoint_ports_and_temp_dirs(ids):
    a, b = (print_config(i) for i in ids)
    assert a["temp_dir"] != b["temp_dir"]
    assert print_config(ids[0])["temp_dir"] != a["temp_dir"]  # not predictable from the id
    assert len(a["temp_dir"]) <= 50  # Ray's socket paths stay under 107 characters
    pa, pb = _ports(a), _ports(b)
    assert not pa & pb
    for cfg, ports in ((a, pa), (b, pb)):
        assert all(20000 <= p < 32768 for p in ports)  # below the ephemeral range
        lo, hi = (int(p) for p in cfg["port_block"].split("-"))
        assert ports <= set(range(lo, hi + 1))
    # Every port Ray would otherwise take at a fixed or random default is set.
    names = {k for k in a if k.endswith("_port")}
    assert names == {
        "gcs_port",
        "dashboard_port",
        "ray_client_server_port",
        "node_manager_port",
        "object_manager_port",
        "dashboard_agent_listen_port",
        "dashboard_agent_grpc_port",
        "metrics_export_port",
        "runtime_env_agent_port",
        "min_worker_port",
        "max_worker_port",
    }


@pytest.mark.timeout(60)
def test_refuses_to_run_outside_slurm(tmp_path):
    env = {k: v for k, v in node_env().items() if not k.startswith("SLURM_")}
    r = subprocess.run(["bash", str(SCRIPT), "x.py"], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "submit with sbatch" in r.stderr


def _free_job_id(stride: int) -> tuple[int, dict[str, str]]:
    """A job id whose port block, and the next ``stride`` ports for node 2, are free here."""
    for _ in range(50):
        job = random.randrange(100_000, 999_999)
        cfg = print_config(job)
        lo = int(cfg["gcs_port"])
        if all(port_free(p) for p in range(lo, lo + 2 * stride)):
            return job, cfg
    pytest.skip("no free port block for the fake Slurm job")


def _run_script(tmp_path: Path, entry: list[str], timeout: float, **extra: str):
    """Run the batch script like Slurm would on two nodes; returns (result, cfg, srun log).

    Whatever happens, nothing of the job's Ray is left running afterwards.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    job, cfg = _free_job_id(stride=100)
    log = tmp_path / "srun.log"
    env = node_env()  # no token: the script makes one
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        FAKE_SLURM_LOG=str(log),
        SLURM_JOB_ID=str(job),
        SLURM_JOB_NODELIST="fake-node-[1-2]",
        SLURM_SUBMIT_DIR=str(ROOT),
        SLURM_CPUS_PER_TASK="2",
        MEDCAE_NODE_PORT_STRIDE="100",  # both fake nodes share this host
        MEDCAE_JOIN_TIMEOUT="150",
        MEDCAE_STOP_TIMEOUT="20",
        **extra,
    )
    prefix = f"/tmp/medcae-{job}"  # + "-<random suffix>-<node>", private to each node
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), *entry],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script's own cleanup first
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"batch script timed out after {timeout}s:\n{out[-6000:]}")
    finally:
        leftovers = wait_gone(proc.pid, f"{prefix}-")
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        temp_dirs = sorted(Path("/tmp").glob(f"medcae-{job}-*"))
        cfg["temp_modes"] = {d.name: d.stat().st_mode & 0o777 for d in temp_dirs}
        token = extra.get("RAY_AUTH_TOKEN", "").encode()
        cfg["token_files"] = {  # every file of the job that holds the token, and its mode
            str(f): f.stat().st_mode & 0o777
            for d in temp_dirs
            for f in d.rglob("*")
            if token and f.is_file() and not f.is_symlink() and token in f.read_bytes()
        }
        for d in temp_dirs:
            shutil.rmtree(d, ignore_errors=True)
    assert not leftovers, f"Ray processes left after the job: {leftovers}\n{out[-6000:]}"
    return proc.returncode, out, cfg, log.read_text() if log.exists() else ""


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(420)
def test_two_fake_nodes_run_an_entry_point(tmp_path):
    entry = tmp_path / "entry.py"
    entry.write_text(ENTRY)
    token = secrets.token_hex(32)
    rc, out, cfg, sruns = _run_script(
        tmp_path, [str(entry), "--flag", "x y"], timeout=300, RAY_AUTH_TOKEN=token
    )
    assert rc == 0, out[-6000:]
    assert "all 2 Ray node(s) joined" in out
    line = next(x for x in out.splitlines() if x.startswith("SLURM_TEST_RESULT "))
    result = json.loads(line.split(" ", 1)[1])
    assert len(set(result["alive"])) == 2
    assert sorted(result["ran_on"]) == sorted(result["alive"])
    assert result["args"] == ["--flag", "x y"]  # arguments reach the entry point intact
    starts = [s for s in sruns.splitlines() if "/ray start " in s]
    assert len(starts) == 2
    assert "-w fake-node-1" in starts[0] and "--head" in starts[0]
    assert "-w fake-node-2" in starts[1] and "--address=" in starts[1]
    assert f"--port={cfg['gcs_port']}" in starts[0]
    assert all("RAY_AUTH_TOKEN" not in s for s in sruns.splitlines())  # token only in env
    assert "stopping 2 Ray node(s)" in out
    # One private temp dir per node, named with an unpredictable suffix.
    assert len(cfg["temp_modes"]) == 2 and set(cfg["temp_modes"].values()) == {0o700}, cfg
    assert all(len(name.split("-")[2]) == 8 for name in cfg["temp_modes"])
    # The cluster's token is in no log and no file others can read.
    assert token not in out and token not in sruns
    logs = [f for f in cfg["token_files"] if Path(f).suffix in (".log", ".out", ".err")]
    assert not logs, logs
    readable = {f: oct(m) for f, m in cfg["token_files"].items() if m & 0o044}
    assert not readable, readable


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_node_that_never_joins_fails_the_job_clearly(tmp_path):
    entry = tmp_path / "entry.py"
    entry.write_text("raise SystemExit('the entry point must not run')\n")
    rc, out, _, _ = _run_script(tmp_path, [str(entry)], timeout=200, FAKE_SLURM_BROKEN="1")
    assert rc != 0
    assert "only 1 of 2 Ray nodes joined" in out, out[-4000:]
    assert "must not run" not in out
