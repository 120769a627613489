"""The bench end to end at its shortest: one round of 1-second tests; the JSON's shape, never the speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.harness import PREFIX
from bench.plan import BY_NAME, DEFAULT_VARIANTS, TESTS

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]


def test_quick_bench_writes_every_variant(tmp_path):
    argv = [sys.executable, "-m", "bench", "--quick", "--seconds", "1", "--ping-count", "5"]
    argv += ["--out", str(tmp_path)]
    pipe = subprocess.PIPE
    bench = subprocess.Popen(argv, cwd=ROOT, stdout=pipe, stderr=pipe, text=True)
    try:
        stdout, stderr = bench.communicate(timeout=110)
    finally:
        if bench.poll() is None:
            bench.terminate()  # the bench cleans up on SIGTERM as on Ctrl-C
            bench.communicate(timeout=30)
    assert bench.returncode == 0, stdout[-3000:] + stderr[-3000:]
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 1 and files[0].name.endswith("-quick.json")
    assert files[0].with_suffix(".png").stat().st_size > 1000
    result = json.loads(files[0].read_text())

    for key in ("nproc", "cpu_model", "kernel", "python", "date"):
        assert result["machine"][key], key
    assert result["config"]["rounds"] == 1 and result["errors"] == []
    runs = {r["variant"]: r for r in result["runs"]}
    assert set(runs) == set(DEFAULT_VARIANTS) and len(result["runs"]) == len(DEFAULT_VARIANTS)
    for name, run in runs.items():
        assert set(run["tests"]) == set(TESTS), name
        for test, rec in run["tests"].items():
            assert "error" not in rec, (name, test, rec)
        assert run["tests"]["tcp1"]["received_bps"] > 0
        assert run["tests"]["tcp1"]["retransmits"] >= 0
        assert run["tests"]["udp"]["delivered_pps"] > 0
        assert 0 <= run["tests"]["udp"]["lost_percent"] <= 100
        assert run["tests"]["ping"]["median_ms"] > 0
        assert run["mtu"] > 0
        cpu = run["tests"]["tcp1"]["proxy_cpu_s"]
        if BY_NAME[name].backend is None:
            assert cpu is None and run.get("daemons") in (None, [])
        else:
            assert cpu >= 0
            assert [d["returncode"] for d in run["daemons"]] == [0, 0]
            assert run["leftovers"] == []
    for variant, row in result["summary"].items():
        assert row["tcp1_gbps"]["n"] == 1, variant
    assert result["ratios"]["udp"]["udp-batch1"]["tcp1_gbps"] > 0

    # The table is on the terminal, and the run left no namespace behind.
    assert "udp-batch1" in stdout and "TCP x1 /vxlan" in stdout
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{PREFIX}{bench.pid}-" not in netns
