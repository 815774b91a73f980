"""Prometheus metrics of the Serve app, through Ray's metrics export.

Each replica records into :mod:`ray.util.metrics`; every Ray node exports them as Prometheus
text at its metrics export port (``medcae serve --metrics-port PORT``:
``http://127.0.0.1:PORT/metrics``), with Ray's ``ray_`` prefix:

- ``ray_medcae_requests_total{model, version, route, status}``: every request but the page's
  assets and ``/healthz``, by final HTTP status;
- ``ray_medcae_request_latency_ms{model, route}``: a histogram of the time in the replica;
- ``ray_medcae_predictions_total{model, version, label}``: answered images by predicted label;
- ``ray_medcae_out_of_distribution_total{model, version}``: answers flagged out of distribution.

Label values come from the server's own model names and routes; a request for a name it does
not serve counts as model ``unknown``, so hostile URLs cannot grow the label set.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]
_ROUTES = ("predict/batch", "predict", "explain", "card", "stats")


class _Metrics:
    """The metric objects, made on first use in the replica from ``backend`` (Ray's
    :mod:`ray.util.metrics`, handed over by the Serve app)."""

    def __init__(self, m: Any) -> None:
        self.requests = m.Counter(
            "medcae_requests_total",
            description="Requests by model, version, route and HTTP status.",
            tag_keys=("model", "version", "route", "status"),
        )
        self.latency = m.Histogram(
            "medcae_request_latency_ms",
            description="Time from request to response in the replica, milliseconds.",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("model", "route"),
        )
        self.predictions = m.Counter(
            "medcae_predictions_total",
            description="Answered images by model, version and predicted label.",
            tag_keys=("model", "version", "label"),
        )
        self.ood = m.Counter(
            "medcae_out_of_distribution_total",
            description="Answers whose image the model flagged out of distribution.",
            tag_keys=("model", "version"),
        )


_metrics: _Metrics | None = None
_backend: Any = None
_models: tuple[str, ...] = ()


def _no_id() -> str | None:
    return None


_context_id: Callable[[], str | None] = _no_id


def configure(
    models: Iterable[str],
    backend: Any = None,
    context_id: Callable[[], str | None] | None = None,
) -> None:
    """The model names requests may be counted under (the first answers ``/v1/...``), the
    metrics ``backend`` (``ray.util.metrics``; None: nothing is recorded) and where the
    serving framework keeps the current request's id."""
    global _models, _backend, _metrics, _context_id
    _models, _backend, _metrics = tuple(models), backend, None
    _context_id = context_id or _no_id


def _get() -> _Metrics | None:
    global _metrics
    if _metrics is None and _backend is not None:
        _metrics = _Metrics(_backend)
    return _metrics


def classify(path: str) -> tuple[str, str] | None:
    """``(model, route)`` of a request path, or None for what is not counted."""
    parts = path.strip("/").split("/")
    if parts[:1] != ["v1"] or len(parts) < 2:
        return None
    default = _models[0] if _models else "unknown"
    if parts[1] == "models":
        if len(parts) == 2:
            return default, "models"
        name = parts[2] if parts[2] in _models else "unknown"
        rest = "/".join(parts[3:]) or "info"
        return name, rest if rest in (*_ROUTES, "info") else "other"
    rest = "/".join(parts[1:])
    if rest == "model":
        return default, "info"
    if rest == "model/card":
        return default, "card"
    return default, rest if rest in _ROUTES else "other"


def record_predictions(model: str, version: str, predictions: Iterable[dict[str, Any]]) -> None:
    """Count answered images by label, and those out of distribution. A multi-label answer
    counts once per finding present (or once as ``no finding``), so the label values stay the
    model's finding names, never their combinations."""
    m = _get()
    if m is None:
        return
    for p in predictions:
        found = p.get("findings")
        labels = [p["label"]] if found is None else [f for f, yes in found.items() if yes]
        for label in labels or [p["label"]]:
            m.predictions.inc(1, {"model": model, "version": version, "label": label})
        if not p["in_distribution"]:
            m.ood.inc(1, {"model": model, "version": version})


class RequestMetrics:
    """ASGI middleware: gives each request its id in ``request.state.request_id`` (the one
    Serve's proxy sends back as ``X-Request-ID``), counts it by final status and times it.
    The handler puts the answering version in ``request.state.version`` (``-``: none)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from medcae.serving.answers import request_id

        given = next((v for k, v in scope.get("headers", ()) if k == b"x-request-id"), None)
        rid = request_id(given.decode("latin-1") if given is not None else None, _context_id())
        scope.setdefault("state", {})["request_id"] = rid
        where = classify(scope.get("path", ""))
        start = time.perf_counter()
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            m = _get() if where is not None else None
            if m is not None and where is not None:
                model, route = where
                version = str(scope.get("state", {}).get("version", "-"))
                tags = {"model": model, "version": version, "route": route}
                m.requests.inc(1, {**tags, "status": str(status[0])})
                ms = (time.perf_counter() - start) * 1000
                m.latency.observe(ms, {"model": model, "route": route})
