"""A real Prometheus server on loopback (Debian's ``prometheus``), scraping given targets."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers import free_port


@contextmanager
def prometheus(folder: Path, targets: list[str], every_s: int = 1) -> Iterator[str]:
    """Start Prometheus scraping ``targets`` (``host:port``) every ``every_s``; yields its
    base URL, and stops it (and its storage) at the end."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("needs Debian's prometheus (apt-get install prometheus; .ci/run does)")
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "prometheus.yml"
    config.write_text(
        json.dumps(  # YAML is a superset of JSON
            {
                "global": {"scrape_interval": f"{every_s}s", "scrape_timeout": f"{every_s}s"},
                "scrape_configs": [
                    {"job_name": "medcae", "static_configs": [{"targets": targets}]}
                ],
            }
        )
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=(folder / "prometheus.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError((folder / "prometheus.log").read_text()[-3000:])
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def query(base: str, promql: str) -> list[dict]:
    """The instant vector of ``promql``: ``[{"metric": {...}, "value": [t, "v"]}, ...]``."""
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]
