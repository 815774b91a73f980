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
from pathlib import Path

WRAPPER = r"""
import ctypes, json, os, signal, subprocess, sys, time, urllib.request
import psutil

ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
cmd, report, url, settle = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
stop = getattr(signal, sys.argv[5])
proc = subprocess.Popen(cmd)
if url:  # a server: wait until it answers, then stop it as a user (Ctrl-C) or a system would
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except Exception:
            time.sleep(1)
    served = proc.poll() is None
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
    **kwargs,
) -> tuple[subprocess.CompletedProcess, dict]:
    """``subprocess.run`` of ``cmd`` under the wrapper; returns the result and its report:
    ``{"rc", "served", "left": [pid and command line of each leftover process]}``.

    With ``health_url``, the command is a server: once the URL answers it gets ``stop_signal``.
    """
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            WRAPPER,
            json.dumps(cmd),
            str(report),
            health_url,
            str(settle_s),
            stop_signal,
        ],
        **kwargs,
    )
    return res, json.loads(Path(report).read_text())
