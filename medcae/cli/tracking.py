"""Experiment tracking with MLflow (``--mlflow [URI]`` on ``run``, ``tune`` and ``evaluate``).

Without a value the store is ``mlruns.db`` in the working folder, a SQLite database (MLflow's
recommended local backend, artifacts beside it in ``./mlruns``): ``mlflow ui --backend-store-uri
sqlite:///mlruns.db`` and a user's own ``MlflowClient`` read it as it is. A local folder given
here is MLflow's file store, which MLflow 3 refuses unless ``MLFLOW_ALLOW_FILE_STORE=true``: it is
an explicit choice, so medcae sets that variable for its own writes (a reader needs it too). Any
other URI (``http://...``, ``sqlite:///...``, ``databricks``) goes to MLflow as it is.

What is logged, per job:

- ``run``: the flattened config as parameters; per CAE epoch ``train_loss`` and ``val_loss``
  (step = epoch); the test metrics of every method in the run's report; the bundle and
  ``run.log`` as artifacts.
- ``tune``: every trial as its own MLflow run, through Ray's ``MLflowLoggerCallback`` (its
  parameters and each reported epoch); then one summary run with the best parameters, the best
  validation AUC, the test metrics and the best bundle.
- ``evaluate``: one run with the mean test AUC of every (method, budget) and the report.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: ``--mlflow`` without a value: this SQLite database in the working folder.
DEFAULT_URI = "sqlite:///mlruns.db"
_MAX_PARAM = 500  # MLflow's limit on a parameter value's length


def tracking_uri(value: str | None) -> str | None:
    """The URI to track to, or None when tracking is off.

    A relative SQLite path (the default ``sqlite:///mlruns.db`` included) and a local folder
    become absolute, so that Ray's callback (which may run elsewhere in the process tree)
    writes to the same place; a folder becomes a ``file:`` URI and MLflow's file store is
    allowed for it.
    """
    if not value:
        return None
    if value.startswith(("http://", "https://")):
        # MLflow's default retries (7, exponential backoff) keep a job waiting minutes for a
        # server that is down; tracking is a side channel, so fail within seconds instead.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    if value.startswith("sqlite:///") and not value.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(value[len("sqlite:///") :]).expanduser().resolve())
    if "://" in value or value.startswith(("databricks", "file:")):
        if value.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return value
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return Path(value).expanduser().resolve().as_uri()


def metric_name(text: str) -> str:
    """A name MLflow accepts (letters, digits, ``_ - . /``): ``frozen final + logreg`` ->
    ``frozen_final_logreg``."""
    return re.sub(r"[^A-Za-z0-9_\-./]+", "_", text).strip("_")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"cae": {"lr": 1e-3}}`` -> ``{"cae.lr": "0.001"}``; values cut to MLflow's limit."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = str(v)[:_MAX_PARAM]
    return out


def log_job(
    uri: str | None,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, float] | None = None,
    series: Mapping[str, Iterable[float]] | None = None,
    artifacts: Mapping[str, Path] | None = None,
    tags: Mapping[str, str] | None = None,
) -> str | None:
    """Log one finished job as one MLflow run; returns its run id (None when ``uri`` is None).

    Args:
        uri: From :func:`tracking_uri`.
        experiment: MLflow experiment name (created when missing).
        run_name: The run's name.
        params: Nested parameters (flattened with dots).
        metrics: Final values.
        series: Per-step values, logged with ``step`` = their index.
        artifacts: ``{artifact folder: local file or folder}``.
        tags: Extra tags.

    Tracking is a side channel: if MLflow cannot log, the job's own results are already on
    disk, so the error is logged as a warning and the job still succeeds.
    """
    if uri is None:
        return None
    try:
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        found = client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found else client.create_experiment(experiment)
        run = client.create_run(
            exp_id, run_name=run_name, tags={"medcae.job": experiment, **(tags or {})}
        )
        rid = run.info.run_id

        flat = flatten(params)
        items = list(flat.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(rid, params=[Param(k, v) for k, v in items[i : i + 100]])
        stamp = int(run.info.start_time)
        rows = [Metric(metric_name(k), float(v), stamp, 0) for k, v in (metrics or {}).items()]
        for name, values in (series or {}).items():
            rows += [
                Metric(metric_name(name), float(v), stamp, step) for step, v in enumerate(values)
            ]
        for i in range(0, len(rows), 1000):
            client.log_batch(rid, metrics=rows[i : i + 1000])
        for folder, path in (artifacts or {}).items():
            path = Path(path)
            if path.is_dir():
                client.log_artifacts(rid, str(path), folder)
            elif path.is_file():
                client.log_artifact(rid, str(path), folder)
        client.set_terminated(rid)
        log.info("MLflow: logged run %s to %s (experiment %s)", rid, uri, experiment)
        return rid
    except Exception as err:  # tracking must never lose the job's results
        log.warning("MLflow logging to %s failed: %s: %s", uri, type(err).__name__, err)
        return None


def tune_callbacks(uri: str | None, experiment: str) -> list[Any]:
    """Ray Tune callbacks that log every trial to MLflow (none when ``uri`` is None)."""
    if uri is None:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return [MLflowLoggerCallback(tracking_uri=uri, experiment_name=experiment)]
