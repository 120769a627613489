"""The bench's observability pair at its shortest: both variants run and /metrics was scraped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]


def test_observed_and_unobserved_variants_run(tmp_path):
    argv = [sys.executable, "-m", "bench", "--variants", "udp-observed,udp-unobserved", "--tests", "tcp1"]
    argv += ["--rounds", "1", "--seconds", "2", "--out", str(tmp_path)]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    [path] = tmp_path.glob("*.json")
    runs = {r["variant"]: r for r in json.loads(path.read_text())["runs"]}
    assert runs["udp-observed"]["metrics_scrapes"] >= 1
    assert "metrics_scrapes" not in runs["udp-unobserved"]
    assert "--drop-ring" in runs["udp-unobserved"]["daemons"][0]["argv"]
    for run in runs.values():
        assert run["tests"]["tcp1"]["received_bps"] > 0
        assert all(d["returncode"] == 0 for d in run["daemons"])
