"""The Ray Jobs API of the cluster a server runs on, as the labeling loop's job runner
(:class:`medcae.labeling.service.JobRunner`).

The client is made on first use, from the dashboard's address (``http://HOST:8265``); with
token authentication on the cluster, Ray's client adds the token from the environment
(``RAY_AUTH_TOKEN``) itself.
"""

from __future__ import annotations

import threading
from typing import Any

#: Lines of a job's log read for its progress and result.
LOG_TAIL = 200


class RayJobs:
    """Submit and watch jobs through the Ray Jobs API.

    Args:
        address: The dashboard's HTTP address (``http://127.0.0.1:8265``).
        env: Environment variables of every job (``PYTHONPATH``, ``MEDCAE_CACHE_DIR``).
    """

    def __init__(self, address: str, env: dict[str, str] | None = None):
        self.address = address if "://" in address else f"http://{address}"
        self.env = dict(env or {})
        self._client: Any = None
        self._lock = threading.Lock()

    def client(self) -> Any:
        from ray.job_submission import JobSubmissionClient

        with self._lock:
            if self._client is None:
                self._client = JobSubmissionClient(self.address)
            return self._client

    def submit(self, job_id: str, entrypoint: str) -> None:
        """Submit ``entrypoint`` as the job ``job_id`` (its Ray submission id)."""
        runtime_env = {"env_vars": self.env} if self.env else None
        self.client().submit_job(
            entrypoint=entrypoint,
            submission_id=job_id,
            runtime_env=runtime_env,
            metadata={"medcae": "retrain"},
        )

    def status(self, job_id: str) -> tuple[str, str]:
        """``(state, message)``: ``PENDING``, ``RUNNING``, ``SUCCEEDED``, ``FAILED``,
        ``STOPPED``, or ``UNKNOWN`` for a job the cluster does not know."""
        try:
            info = self.client().get_job_info(job_id)
        except RuntimeError as err:  # the SDK's "job does not exist" (HTTP 404)
            if "does not exist" in str(err) or "404" in str(err):
                return "UNKNOWN", str(err)
            raise
        return str(info.status.value if hasattr(info.status, "value") else info.status), (
            info.message or ""
        )

    def logs(self, job_id: str) -> str:
        """The last :data:`LOG_TAIL` lines of the job's driver log."""
        try:
            text = self.client().get_job_logs(job_id)
        except RuntimeError:
            return ""
        return "\n".join(text.splitlines()[-LOG_TAIL:])

    def stop(self, job_id: str) -> bool:
        """Stop a running job (its driver is killed)."""
        return bool(self.client().stop_job(job_id))
