"""The leftover check itself: an orphaned grandchild is seen (and then killed)."""

from __future__ import annotations

from helpers.reaper import run_reaped


def test_an_orphaned_process_is_reported_and_killed(tmp_path):
    marker = f"sleep {417 + len(str(tmp_path)) % 7}"  # a command line to find it by
    run, report = run_reaped(
        ["bash", "-c", f"({marker} &) ; exit 0"], tmp_path / "r.json", settle_s=1, timeout=60
    )
    assert run.returncode == 0 and report["rc"] == 0
    assert len(report["left"]) == 1 and marker in report["left"][0]
    clean, report = run_reaped(["bash", "-c", "exit 0"], tmp_path / "c.json", timeout=60)
    assert report["left"] == []


def test_a_server_counts_as_served_only_after_its_health_url_answered_200(tmp_path):
    """A server whose health URL answers 404 is stopped unserved, and ``during`` never runs;
    one that answers 200 is served, ``during`` runs against it, then the signal stops it."""
    import socket
    import sys
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "healthz").write_text("ok")
    server = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    server += ["--directory", str(tmp_path)]
    base = f"http://127.0.0.1:{port}"

    calls = []
    _, report = run_reaped(
        server,
        tmp_path / "a.json",
        health_url=f"{base}/nothing-here",
        health_timeout_s=8,
        settle_s=5,
        during=lambda: calls.append(1),
        timeout=120,
    )
    assert report["served"] is False and calls == [] and report["left"] == []

    def fetch() -> str:
        with urllib.request.urlopen(f"{base}/healthz", timeout=10) as r:
            return r.read().decode()

    _, report = run_reaped(
        server,
        tmp_path / "b.json",
        health_url=f"{base}/healthz",
        settle_s=5,
        during=fetch,
        timeout=120,
    )
    assert report["served"] is True and report["during"] == "ok" and report["left"] == []


def test_a_server_that_ignores_its_signal_is_killed_with_everything_it_started(tmp_path):
    """Past the timeout, the server (here one that ignores SIGINT) and its children are killed:
    the test fails, and nothing it started outlives it."""
    import subprocess
    import sys

    import psutil
    import pytest

    marker = f"sleep {523 + len(str(tmp_path)) % 7}"
    code = (
        "import signal, subprocess, http.server, socketserver\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        f"subprocess.Popen({marker.split()!r})\n"
        "socketserver.TCPServer(('127.0.0.1', 0), http.server.SimpleHTTPRequestHandler)"
        ".serve_forever()\n"
    )
    with pytest.raises(subprocess.TimeoutExpired):
        run_reaped(
            [sys.executable, "-c", code],
            tmp_path / "r.json",
            health_url="http://127.0.0.1:9/never",  # never served: SIGINT, then the timeout
            health_timeout_s=2,
            timeout=8,
        )
    alive = [
        p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])
    ]
    assert alive == []
