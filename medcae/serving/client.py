"""A small HTTP client for the medcae endpoint (stdlib only)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from medcae.serving.api import sniff

_CTYPES = {"png": "image/png", "jpeg": "image/jpeg", "dicom": "application/dicom"}


class ClientError(RuntimeError):
    """The server is unreachable, timed out, or rejected the request."""


def _call(req: urllib.request.Request, url: str, timeout: float) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        body = err.read().decode(errors="replace")
        try:
            detail = json.loads(body).get("detail", body)
        except ValueError:
            detail = body
        raise ClientError(f"{url}: HTTP {err.code}: {detail}") from err
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        reason = getattr(err, "reason", err)
        raise ClientError(
            f"cannot reach the medcae server at {url} ({reason}); is it running? "
            "Start it with `serve run serve/config.yaml`"
        ) from err


class MedcaeClient:
    """Client of one medcae server.

    Args:
        url: Base URL, e.g. ``http://127.0.0.1:8000``.
        timeout: Seconds per request.
        api_key: Sent as ``Authorization: Bearer``; default ``$MEDCAE_API_KEY`` (none if unset).
        model: A model of a server that serves several (``/v1/models/{model}/predict``, and
            Serve routes the request to a replica that holds it); default: the server's default.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        timeout: float = 30.0,
        api_key: str | None = None,
        model: str | None = None,
    ):
        self.url = url.rstrip("/")
        self.timeout = timeout
        key = api_key if api_key is not None else os.environ.get("MEDCAE_API_KEY", "")
        self.auth = {"Authorization": f"Bearer {key}"} if key else {}
        self.model = model

    def predict_bytes(self, data: bytes) -> dict[str, Any]:
        """``POST /v1/predict`` (or the ``model``'s route) with encoded image bytes; returns
        the JSON response."""
        ctype = _CTYPES.get(sniff(data), "application/octet-stream")
        headers = {"Content-Type": ctype, **self.auth}
        path = "/v1/predict"
        if self.model:
            path = f"/v1/models/{urllib.parse.quote(self.model, safe='')}/predict"
            headers["serve_multiplexed_model_id"] = self.model
        req = urllib.request.Request(f"{self.url}{path}", data=data, method="POST", headers=headers)
        return _call(req, req.full_url, self.timeout)

    def predict_file(self, path: str | Path) -> dict[str, Any]:
        """Predict one image file (PNG, JPEG or DICOM)."""
        return self.predict_bytes(Path(path).read_bytes())

    def model(self) -> dict[str, Any]:
        """``GET /v1/model``."""
        req = urllib.request.Request(f"{self.url}/v1/model", headers=self.auth)
        return _call(req, req.full_url, self.timeout)

    def health(self) -> dict[str, Any]:
        """``GET /healthz``."""
        req = urllib.request.Request(f"{self.url}/healthz")
        return _call(req, req.full_url, self.timeout)
