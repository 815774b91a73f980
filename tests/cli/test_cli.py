"""The ``medcae`` command: subcommands, shared flags, shims, errors and the quiet console."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT

from medcae.cli import args as jobargs
from medcae.cli.errors import run_cli, user_message
from medcae.cli.logs import console_lines
from medcae.cli.main import JOBS, build_parser, main
from medcae.data import DataError

#: ray_jobs/ shim -> the ``medcae`` command it runs.
SHIMS = {
    "pipeline.py": "run",
    "train.py": "train",
    "tune.py": "tune",
    "evaluate.py": "evaluate",
    "predict.py": "predict",
    "suggest.py": "suggest",
    "retrain.py": "retrain",
}
#: The jobs that start from a bundle need one, so they have no --smoke-test: --bundle instead.
BUNDLE_SHIMS = {"predict.py", "suggest.py"}
#: flag -> (value given, Namespace attribute, parsed value); every job must accept all of them.
SHARED_FLAGS = {
    "--data": ("x.npz", "data", "x.npz"),
    "--unlabeled": ("scans/", "unlabeled", "scans/"),
    "--data-dir": ("/d", "data_dir", "/d"),
    "--backbone": ("resnet18", "backbone", "resnet18"),
    "--taps": ("layer2,layer3", "taps", ("layer2", "layer3")),
    "--resolution": ("64", "resolution", 64),
    "--backbone-weights": ("w.pt", "backbone_weights", "w.pt"),
    "--address": ("auto", "address", "auto"),
    "--num-cpus": ("4", "num_cpus", 4),
    "--smoke-test": (None, "smoke_test", True),
}


def _run(*args: str, timeout: float = 60, env: dict | None = None):
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("command", [*JOBS, "serve", "predict", "suggest"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as ex:
        main([command, "--help"])
    assert ex.value.code == 0
    assert f"usage: medcae {command}" in capsys.readouterr().out


@pytest.mark.parametrize("job", list(JOBS))
@pytest.mark.parametrize("flag", list(SHARED_FLAGS))
def test_shared_flags_are_accepted_by_every_job(job, flag):
    given, attr, parsed = SHARED_FLAGS[flag]
    args = build_parser().parse_args([job, flag] if given is None else [job, flag, given])
    assert getattr(args, attr) == parsed


@pytest.mark.parametrize("job", list(JOBS))
def test_shared_flags_reach_the_config(job):
    argv = [job, "--data", "d.npz", "--unlabeled", "u/", "--backbone", "resnet18"]
    argv += ["--taps", "layer3", "--resolution", "64", "--backbone-weights", "w.pt"]
    cfg = jobargs.config_from_args(build_parser().parse_args(argv))
    assert (cfg.data, cfg.unlabeled) == ("d.npz", "u/")
    assert (cfg.backbone.name, cfg.backbone.taps) == ("resnet18", ("layer3",))
    assert (cfg.backbone.resolution, cfg.backbone.weights) == (64, "w.pt")


def test_defaults_build_the_default_config():
    from medcae.config import PipelineConfig

    for job in JOBS:
        cfg = jobargs.config_from_args(build_parser().parse_args([job]))
        expected = PipelineConfig()
        assert cfg.backbone == expected.backbone and cfg.train == expected.train, job


@pytest.mark.parametrize("text, value", [("0.1", 0.1), ("20", 20), ("1.0", 1.0), ("1", 1)], ids=str)
def test_one_budget_parser(text, value):
    assert jobargs.budget(text) == value and type(jobargs.budget(text)) is type(value)
    assert jobargs.budgets(f"{text},5") == [value, 5]


def test_bad_budget_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as ex:
        build_parser().parse_args(["run", "--budget", "lots"])
    assert ex.value.code == 2 and "label budget 'lots'" in capsys.readouterr().err


def test_one_smoke_size_in_every_help(capsys):
    sizes = ", ".join(f"{k} {v}" for k, v in jobargs.SMOKE_SIZES.items())
    for job in JOBS:
        with pytest.raises(SystemExit):
            main([job, "--help"])
        assert sizes in " ".join(capsys.readouterr().out.split()), job


@pytest.mark.parametrize(
    "shim", sorted(set(SHIMS) | {p.name for p in (ROOT / "ray_jobs").glob("*.py")})
)
def test_ray_jobs_are_short_shims_with_help_and_their_flag(shim):
    """Every entry point in ray_jobs/ is a short shim that runs its ``medcae`` command; its
    ``--help`` works and shows --smoke-test, or --bundle for the jobs that start from a bundle
    (they need one, so they have no --smoke-test)."""
    assert shim in SHIMS, f"ray_jobs/{shim}: a new entry point? name its command in SHIMS"
    command = SHIMS[shim]
    text = (ROOT / "ray_jobs" / shim).read_text()
    assert f'main(["{command}", *sys.argv[1:]])' in text
    if shim not in BUNDLE_SHIMS:
        code = [x for x in text.split('"""')[-1].splitlines() if x.strip()]
        assert len(code) <= 8
    out = _run(f"ray_jobs/{shim}", "--help")
    assert out.returncode == 0, out.stderr
    flag = "--bundle" if shim in BUNDLE_SHIMS else "--smoke-test"
    assert f"usage: medcae {command}" in out.stdout and flag in out.stdout


def test_serve_replicas_below_one_is_one_error_line_before_ray(tmp_path):
    from helpers import medcae_subprocess  # fails the command if Ray was imported

    out = medcae_subprocess("serve", "--bundle", str(tmp_path), "--replicas", "0")
    assert out.returncode == 2, out.stderr
    assert out.stderr == "error: --replicas 0: expected at least 1\n"


# --------------------------------------------------------------------------- errors


def _raise(err: BaseException):
    def fn() -> int:
        raise err

    return fn


@pytest.mark.parametrize(
    "err, match",
    [
        (DataError("no such file or folder: /x.npz"), "no such file or folder: /x.npz"),
        (FileNotFoundError(2, "No such file or directory", "/data/x.npz"), "/data/x.npz"),
    ],
    ids=["DataError", "FileNotFoundError-with-path"],
)
def test_user_errors_are_one_line(err, match, capsys):
    assert run_cli(_raise(err)) == 2
    err_out = capsys.readouterr().err
    assert err_out.count("\n") == 1 and err_out.startswith("error: ") and match in err_out


@pytest.mark.parametrize(
    "err",
    [FileNotFoundError(2, "No such file or directory"), RuntimeError("bug"), KeyError("k")],
    ids=["FileNotFoundError-without-path", "RuntimeError", "KeyError"],
)
def test_other_errors_keep_their_traceback(err, capsys):
    assert user_message(err) is None
    assert run_cli(_raise(err)) == 1
    out = capsys.readouterr().err
    assert out.startswith("Traceback (most recent call last)")
    assert type(err).__name__ in out.splitlines()[-1]


def test_lost_working_directory_keeps_traceback_in_console_and_run_log(tmp_path):
    """The old behaviour printed only ``error: [Errno 2] No such file or directory``."""
    code = (
        "import os, sys, torch  # a job has torch loaded long before it fails\n"
        "from medcae.cli.errors import run_cli\n"
        "from medcae.cli.logs import setup_run_logging\n"
        f"setup_run_logging({str(tmp_path / 'out')!r})\n"
        f"os.makedirs({str(tmp_path / 'gone')!r}); os.chdir({str(tmp_path / 'gone')!r})\n"
        f"os.rmdir({str(tmp_path / 'gone')!r})\n"
        "sys.exit(run_cli(lambda: len(os.getcwd())))\n"
    )
    out = _run("-c", code, env={"PYTHONPATH": str(ROOT)})
    assert out.returncode == 1
    assert "Traceback (most recent call last)" in out.stderr and "in <lambda>" in out.stderr
    assert not out.stderr.strip().splitlines()[-1].startswith("error:")
    log = (tmp_path / "out" / "run.log").read_text()
    assert "Traceback (most recent call last)" in log and "FileNotFoundError" in log


# --------------------------------------------------------------------------- logging


def test_run_log_takes_ray_lines_and_console_keeps_medcae_progress(tmp_path):
    code = (
        "import logging\n"
        "from medcae.cli.logs import setup_console, setup_run_logging\n"
        "setup_console()\n"
        "logging.getLogger('medcae.data').info('EARLY-LOADED')\n"
        f"setup_run_logging({str(tmp_path)!r})\n"
        "logging.getLogger('ray.data').info('Execution plan of Dataset d_0: X -> Y')\n"
        "logging.getLogger('ray.data._internal.logging').info('Registered dataset logger')\n"
        "logging.getLogger('ray').info('Started a local Ray instance.')\n"
        "logging.getLogger('ray.train').info('RAY-TRAIN-INFO')\n"
        "logging.getLogger('ray.tune').info('RAY-TUNE-INFO')\n"
        "logging.getLogger('ray.data').warning('RAY-DATA-WARNING')\n"
        "logging.getLogger('ray.data').warning('Progress bars disabled. To enable, set ...')\n"
        "logging.getLogger('medcae.progress').info('extract: 10/10 images, 5.0 images/s')\n"
        "logging.getLogger('thirdparty').info('THIRD-PARTY-INFO')\n"
    )
    out = _run("-c", code, timeout=120, env={"PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    console = out.stdout + out.stderr
    log = (tmp_path / "run.log").read_text()
    for line in ("Execution plan", "Started a local Ray", "RAY-TRAIN-INFO", "RAY-TUNE-INFO"):
        assert line in log and line not in console, line
    assert "Registered dataset logger" not in console and "THIRD-PARTY-INFO" in log
    assert "THIRD-PARTY-INFO" not in console and "Progress bars disabled" not in console
    assert "EARLY-LOADED" in console and "EARLY-LOADED" in log  # buffered until the file opened
    assert "extract: 10/10 images" in console and "extract: 10/10 images" in log
    assert "RAY-DATA-WARNING" in console and "RAY-DATA-WARNING" in log


def test_forwarded_worker_lines_keep_progress_and_errors():
    lines = [
        "Starting execution of Dataset train_0. Full logs are in /tmp/ray/session/logs",
        "Execution plan of Dataset train_0: InputDataBuffer[Input] -> OutputSplitter",
        "Setting up process group for: env:// [rank=0, world_size=1]",
        "epoch 1/2 train_loss 1.1568 val_loss 1.0204 21 samples/s ETA 4s",
        "Reporting training result 1: TrainingReport(...)",
        "medcae.progress: CAE: 96 maps",
        "2026-01-01 12:00:00,000\tWARNING foo.py:1 -- disk almost full",
        "x/execution_options.py:436: RayDeprecationWarning: `exclude_resources` is deprecated",
        "WARNING: 8 PYTHON worker processes have been started on node: 85b1 with address: "
        "192.0.2.2, which is 4x the maximum expected startup concurrency (2).",
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in <module>',
        "ValueError: boom",
    ]
    assert console_lines(lines) == [lines[3], lines[5], lines[6], *lines[9:]]


@pytest.mark.ray
@pytest.mark.slow
def test_medcae_run_smoke_is_quiet_and_logs_to_file(tmp_path):
    """``medcae run`` as a user types it, on the demo's multi-label variant (the single-label
    demo runs through the same command in the multi-node and recovery tests)."""
    from helpers.reaper import run_reaped

    out_dir = tmp_path / "run"
    run, report = run_reaped(
        [sys.executable, "-m", "medcae", "run", "--data", "demo-findings", "--smoke-test"]
        + ["--data-dir", str(tmp_path / "data")]
        + ["--out", str(out_dir), "--num-cpus", "4", "--mlflow", "--register", "demo-model"],
        tmp_path / "reaper.json",
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # --mlflow without a value: ./mlruns.db here
        env={**os.environ, "MEDCAE_CACHE_DIR": str(tmp_path / "cache")},
    )
    console = run.stdout + run.stderr
    assert run.returncode == 0, console[-4000:]
    assert report["left"] == [], report  # no Ray process of the job outlives it
    assert "AUC macro" in run.stdout and "AUC micro" in run.stdout
    for finding in ("nodule", "ring", "effusion"):  # the per-finding table, and how it decides
        assert any(x.startswith(f"{finding} ") for x in run.stdout.splitlines()), run.stdout
        assert f"{finding}: operating point youden: p({finding}) >= " in console
    bundle = next(x for x in run.stdout.splitlines() if x.startswith("model bundle: "))
    meta = json.loads((Path(bundle.split(": ", 1)[1]) / "bundle.json").read_text())
    # --representation auto (the default): every candidate fitted, one chosen, and why
    rep = meta["representation"]
    assert set(rep["val_auc"]) == {
        "frozen_final",
        "frozen_tap",
        "cae",
        "cae_concat",
        "cae_ensemble",
    }
    assert rep["name"] in rep["val_auc"] and rep["reason"].startswith(rep["name"])
    assert meta["config"]["classifier"]["representation"] == rep["name"]
    table = [x for x in run.stdout.splitlines() if not x.startswith("MEDCAE_RESULT")]
    assert sum("(chosen)" in line for line in table) == 1  # one row of the results table
    log = (out_dir / "run.log").read_text()
    assert "ray" in log and "Execution plan" in log, log[-3000:]
    for chatter in ("Execution plan", "Registered dataset logger", "Tip:", "Starting execution"):
        assert chatter not in console, console[-4000:]
    # --mlflow: the SQLite database in the working folder reads back with MLflow's own client
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    (mlrun,) = client.search_runs([client.get_experiment_by_name("medcae-run").experiment_id])
    line = run.stdout.split("MEDCAE_RESULT ", 1)[1].splitlines()[0]
    assert len(line) < 2000, len(line)  # short: the history and config are in results.json
    result = json.loads(line)
    full = json.loads(Path(result["results"]).read_text())
    assert Path(result["results"]) == out_dir / "results.json"
    assert run.stdout.splitlines()[-2:] == [
        f"results: {out_dir / 'results.json'}",
        f"model bundle: {result['bundle']}",
    ]
    assert mlrun.data.params["cae.epochs"] == str(result["epochs"]) == str(len(full["history"]))
    history = client.get_metric_history(mlrun.info.run_id, "val_loss")
    assert [m.value for m in history] == pytest.approx([h["val_loss"] for h in full["history"]])
    assert any(k.endswith("auc") for k in mlrun.data.metrics), mlrun.data.metrics
    assert any("finding.nodule.sensitivity.ci_low" in k for k in mlrun.data.metrics)
    assert meta["task"] == "multilabel" and set(meta["operating_point"]["findings"]) == {
        "nodule",
        "ring",
        "effusion",
    }
    files = {a.path for a in client.list_artifacts(mlrun.info.run_id, "bundle")}
    assert {"bundle/bundle.json", "bundle/MODEL_CARD.md"} <= files
    # --register: the bundle is version 1 of demo-model in the same database's registry
    from medcae.registry.models import Registry, bundle_digest

    (version,) = Registry(f"sqlite:///{tmp_path / 'mlruns.db'}").versions("demo-model")
    assert version.version == "1" and version.tags["bundle_sha256"] == bundle_digest(
        result["bundle"]
    )
    assert "test_auc" in version.metrics
    assert any(x.startswith("registered: demo-model version 1 at sqlite:///") for x in table)


def test_mlflow_logging_reads_back_and_never_fails_the_job(tmp_path, monkeypatch):
    """Names MLflow refuses are cleaned, not dropped; an unreachable store only warns; a folder
    is MLflow's file store, which medcae allows for itself."""
    from mlflow.tracking import MlflowClient

    from medcae.cli.tracking import log_job, tracking_uri

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # recorded, so what medcae sets is undone
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    uri = tracking_uri(str(tmp_path / "mlruns"))
    assert uri.startswith("file://") and tracking_uri(None) is None
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"  # set by medcae, not by this test
    (tmp_path / "f.txt").write_text("x")
    rid = log_job(
        uri,
        "exp",
        "r",
        {"cae": {"lr": 0.001, "channels": (32, 16)}},
        metrics={"frozen final + logreg.auc": 0.9},
        series={"val_loss": [3.0, 2.0, 1.0]},
        artifacts={"bundle": tmp_path / "f.txt"},
    )
    client = MlflowClient(uri)
    run = client.get_run(rid)
    assert run.data.params == {"cae.lr": "0.001", "cae.channels": "(32, 16)"}
    assert run.data.metrics["frozen_final_logreg.auc"] == 0.9
    assert [m.step for m in client.get_metric_history(rid, "val_loss")] == [0, 1, 2]
    assert [a.path for a in client.list_artifacts(rid, "bundle")] == ["bundle/f.txt"]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    start = time.monotonic()
    down = tracking_uri("http://127.0.0.1:9")  # nothing listens there
    assert log_job(down, "exp", "r", {"a": 1}) is None  # a warning, not an error
    assert time.monotonic() - start < 30


def test_mlflow_without_a_value_is_a_sqlite_database_in_the_working_folder(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from medcae.cli.main import build_parser
    from medcae.cli.tracking import log_job, tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # recorded, so what medcae sets is undone
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    args = build_parser().parse_args(["run", "--data", "demo", "--mlflow"])
    uri = tracking_uri(args.mlflow)
    assert uri == f"sqlite:///{tmp_path / 'mlruns.db'}"
    rid = log_job(uri, "exp", "r", {"a": 1}, metrics={"auc": 0.5})
    assert (tmp_path / "mlruns.db").is_file()
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # no retired store involved
    assert MlflowClient(uri).get_run(rid).data.metrics == {"auc": 0.5}
