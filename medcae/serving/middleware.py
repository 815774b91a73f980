"""ASGI middleware in front of the HTTP app: the ``Host`` check, then CORS when configured.

The settings live here, in an importable module, because Ray Serve copies the deployment class
and its app into each replica: a module-level dict of ``medcae/serving/app.py`` would be a different
object in the replica's constructor than in the middleware.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from medcae.serving.api import RequestError
from medcae.serving.auth import HOSTS_ENV, LOOPBACK_NAMES, host_allowed, parse_hosts

# What this process's server answers to (one Serve replica per process).
_SETTINGS: dict[str, tuple[str, ...]] = {"hosts": LOOPBACK_NAMES, "cors": ()}
OPEN_PATHS = ("/healthz",)  # liveness probes reach it by any address


def configure_guard(
    allowed_hosts: str | Iterable[str] | None = None,
    cors_origins: str | Iterable[str] | None = None,
) -> dict[str, tuple[str, ...]]:
    """Set the Host names and CORS origins of this process's server.

    Args:
        allowed_hosts: ``name``, ``*.domain`` or ``*``; default ``$MEDCAE_ALLOWED_HOSTS``,
            else the loopback names.
        cors_origins: Origins sent CORS headers; default none (no CORS headers at all).

    Raises:
        ConfigError: A host entry that is not a name, an address or a pattern.
    """
    hosts = parse_hosts(allowed_hosts) or parse_hosts(os.environ.get(HOSTS_ENV), f"${HOSTS_ENV}")
    if isinstance(cors_origins, str):
        cors_origins = cors_origins.split(",")
    _SETTINGS.update(
        hosts=hosts or LOOPBACK_NAMES,
        cors=tuple(o.strip() for o in cors_origins or () if o.strip()),
    )
    return dict(_SETTINGS)


class Guard:
    """Refuses (400 ``bad_host``) a request whose ``Host`` is not a name of this server, except
    on :data:`OPEN_PATHS`; adds CORS headers for the configured origins only."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self._cors: tuple[tuple[str, ...], ASGIApp] | None = None

    def _inner(self) -> ASGIApp:
        origins = _SETTINGS["cors"]
        if not origins:
            return self.app
        if self._cors is None or self._cors[0] != origins:
            cors = CORSMiddleware(
                self.app,
                allow_origins=list(origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
            )
            self._cors = (origins, cors)
        return self._cors[1]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") not in OPEN_PATHS:
            host = next((v for k, v in scope.get("headers", ()) if k == b"host"), b"")
            text = host.decode("latin-1")
            if not host_allowed(text, _SETTINGS["hosts"]):
                err = RequestError(
                    400, "bad_host", f"Host {text[:80]!r} is not a name of this server"
                )
                response: Any = JSONResponse(err.body(), status_code=400)
                await response(scope, receive, send)
                return
        await self._inner()(scope, receive, send)
