"""Run a command and report every process it left behind.

The command runs under a small Python wrapper that makes itself the *child subreaper*
(``prctl(PR_SET_CHILD_SUBREAPER)``): whatever the command starts and orphans (a Ray raylet, a
worker, an actor) is re-parented to the wrapper instead of to init, so after the command exits
its leftovers are exactly the wrapper's remaining descendants. The wrapper records them, then
kills them, so nothing outlives the test either way.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

WRAPPER = r"""
import ctypes, json, os, signal, subprocess, sys, time, urllib.request
import psutil

ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
cmd, report, url, settle = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
stop, health_wait = getattr(signal, sys.argv[5]), float(sys.argv[6])
# As from a terminal: Ctrl-C's signal at its default, even where the test runner ignores it
# (pytest-xdist workers do, and an ignored SIGINT is inherited and never becomes KeyboardInterrupt).
signal.signal(signal.SIGINT, signal.SIG_DFL)
proc = subprocess.Popen(cmd)
if url:  # a server: wait until it answers, then stop it as a user (Ctrl-C) or a system would
    served, deadline = False, time.monotonic() + health_wait
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                served = r.status == 200  # served: the health check answered 200, nothing less
            break
        except Exception:
            time.sleep(1)
    if served:  # the test's own checks run against the live server; it says when to stop
        open(report + ".ready", "w").close()
        while not os.path.exists(report + ".stop") and proc.poll() is None:
            time.sleep(0.2)
    proc.send_signal(stop)
else:
    served = None
rc = proc.wait()
deadline = time.monotonic() + settle  # what the command leaves must be gone by then
while True:
    while True:  # reap the zombies of re-parented processes
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    left = [p for p in psutil.Process().children(recursive=True) if p.status() != "zombie"]
    if not left or time.monotonic() > deadline:
        break
    time.sleep(0.5)
names = []
for p in left:
    try:
        names.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        p.kill()
    except psutil.Error:
        pass
json.dump({"rc": rc, "served": served, "left": names}, open(report, "w"))
sys.exit(rc)
"""


def run_reaped(
    cmd: list[str],
    report: Path,
    *,
    health_url: str = "",
    settle_s: float = 20.0,
    stop_signal: str = "SIGINT",
    during: Callable[[], Any] | None = None,
    health_timeout_s: float = 240,
    timeout: float = 600,
    **kwargs,
) -> tuple[subprocess.CompletedProcess, dict]:
    """``subprocess.run`` of ``cmd`` under the wrapper; returns the result and its report:
    ``{"rc", "served", "left": [pid and command line of each leftover process], "during": ...}``.

    With ``health_url``, the command is a server: ``served`` is true only once that URL
    answered 200; then ``during()`` runs here against the live server (its return value is the
    report's ``during``; an exception in it still stops the server) and the server gets
    ``stop_signal``.
    """
    report = Path(report)
    if kwargs.pop("capture_output", False):
        kwargs |= {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            WRAPPER,
            json.dumps(cmd),
            str(report),
            health_url,
            str(settle_s),
            stop_signal,
            str(health_timeout_s),
        ],
        **kwargs,
    )
    ready, stop = Path(f"{report}.ready"), Path(f"{report}.stop")
    outcome: Any = None
    deadline = time.monotonic() + timeout
    try:
        while health_url and proc.poll() is None and not ready.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cmd[:4]}: not served within {timeout:g} s")
            time.sleep(0.2)
        if ready.exists() and during is not None:
            outcome = during()
    finally:
        stop.touch()
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_tree(proc)  # nothing outlives the test, even a server that ignores its signal
            raise
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return res, {**json.loads(report.read_text()), "during": outcome}


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the wrapper and every descendant (it is their subreaper, so all are below it).

    Each is stopped (SIGSTOP) before anything is killed, and the tree is read again until no
    new process appears: a process killed while its parent is still forking would otherwise
    leave the newborn child behind (seen once under load).
    """
    import psutil

    stopped: dict[int, psutil.Process] = {}
    for _ in range(100):
        try:
            root = psutil.Process(proc.pid)
            family = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        new = [p for p in family if p.pid not in stopped]
        if not new:
            break
        for p in new:
            try:
                p.suspend()
                stopped[p.pid] = p
            except psutil.Error:
                stopped[p.pid] = p
    for p in stopped.values():
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.kill()
    proc.communicate()
