"""The answer log: one JSON line per answered image, append-only, rotated by size (Ray-free).

Each replica writes its own file, ``answers-<host>-<pid>.jsonl`` under the server's log folder,
so replicas never interleave partial lines. A line holds the time, the request id, who asked
(``key:<first 8 hex of the key's digest>`` or ``anonymous``), the route, model, version, label,
probabilities and the out-of-distribution verdict; never image bytes. At ``max_bytes`` the file
is renamed ``.1`` (older ones shift up to ``backups``) and a new one started.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import re
import socket
import time
import uuid
from pathlib import Path
from typing import Any

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def request_id(given: str | None, fallback: str | None = None) -> str:
    """The id of a request: the client's ``X-Request-ID`` when it is a sane token, else
    ``fallback`` (the id the serving framework gave the request) when sane, else a new one."""
    for rid in (given, fallback):
        if rid and _REQUEST_ID.match(rid):
            return rid
    return uuid.uuid4().hex


class AnswerLog:
    """Appends answer lines to ``folder/answers-<host>-<pid>.jsonl``.

    Args:
        folder: The server's log folder (created).
        max_bytes: Rotate when the file would grow past this.
        backups: Rotated files kept.
    """

    def __init__(self, folder: str | Path, max_bytes: int = 50 * 1024 * 1024, backups: int = 5):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"answers-{socket.gethostname()}-{os.getpid()}.jsonl"
        handler = logging.handlers.RotatingFileHandler(
            self.path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=True
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._log = logging.getLogger(f"medcae.answers.{os.getpid()}.{id(self)}")
        self._log.propagate = False
        self._log.setLevel(logging.INFO)
        self._log.addHandler(handler)
        self._handler = handler

    def write(
        self,
        rid: str,
        who: str,
        route: str,
        model: str,
        version: str,
        predictions: list[dict[str, Any]],
    ) -> None:
        """One line per prediction (a batch request writes one per image, with its index)."""
        now = time.time()
        for i, p in enumerate(predictions):
            line = {
                "time": round(now, 3),
                "request_id": rid,
                "key": who,
                "route": route,
                "model": model,
                "version": version,
                "label": p["label"],
                "probabilities": {k: round(v, 6) for k, v in p["probabilities"].items()},
                "in_distribution": p["in_distribution"],
                "reconstruction_error": round(p["reconstruction_error"], 6),
            }
            if len(predictions) > 1:
                line["index"] = i
            self._log.info(json.dumps(line, separators=(",", ":")))

    def close(self) -> None:
        """Flush and close the file."""
        self._log.removeHandler(self._handler)
        self._handler.close()
