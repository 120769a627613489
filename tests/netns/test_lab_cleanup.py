"""A lab whose process was killed before its teardown is swept by the next run; a live one is not."""

from __future__ import annotations

import os
import subprocess

import pytest

from lab.netns import cleanup_dead_labs, sh

pytestmark = pytest.mark.root


def namespaces() -> set[str]:
    return {line.split()[0] for line in sh("ip", "netns", "list", check=False).stdout.splitlines() if line}


def test_namespaces_of_a_dead_run_go_and_a_live_runs_stay():
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that is surely dead
    dead, live = f"tpsweep{gone.pid}x1-h1", f"tpsweep{os.getpid()}x1-h1"
    try:
        for name in (dead, live):
            sh("ip", "netns", "add", name)
        removed = cleanup_dead_labs("tpsweep")
        assert dead in removed and live not in removed
        left = namespaces()
        assert dead not in left and live in left
    finally:
        for name in (dead, live):
            sh("ip", "netns", "del", name, check=False)
