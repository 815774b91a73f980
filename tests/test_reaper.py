"""The leftover check itself: an orphaned grandchild is seen (and then killed)."""

from __future__ import annotations

from reaper import run_reaped


def test_an_orphaned_process_is_reported_and_killed(tmp_path):
    marker = f"sleep {417 + len(str(tmp_path)) % 7}"  # a command line to find it by
    run, report = run_reaped(
        ["bash", "-c", f"({marker} &) ; exit 0"], tmp_path / "r.json", settle_s=1, timeout=60
    )
    assert run.returncode == 0 and report["rc"] == 0
    assert len(report["left"]) == 1 and marker in report["left"][0]
    clean, report = run_reaped(["bash", "-c", "exit 0"], tmp_path / "c.json", timeout=60)
    assert report["left"] == []
