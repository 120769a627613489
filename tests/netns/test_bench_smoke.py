"""The bench end to end at its shortest: one round of 1-second tests; the JSON's shape, never the speed.

Every test runs once for one variant of each kind (kernel, userspace, a speed-up off, workers): iperf3
TCP and UDP (64-byte flood, 1,400-byte bulk), sockperf ping-pong and ping, each a second or so.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.harness import PREFIX
from bench.plan import BY_NAME, DEFAULT_VARIANTS, TARGETS, TESTS

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ("raw", "vxlan", "udp", "udp-batch1", "udp-no-drain", "udp-workers2")
assert set(SMOKE) <= set(DEFAULT_VARIANTS)


def test_quick_bench_writes_every_variant(tmp_path):
    argv = [sys.executable, "-m", "bench", "--quick", "--seconds", "1", "--ping-count", "5"]
    argv += ["--variants", ",".join(SMOKE)]
    argv += ["--out", str(tmp_path)]
    pipe = subprocess.PIPE
    bench = subprocess.Popen(argv, cwd=ROOT, stdout=pipe, stderr=pipe, text=True)
    try:
        stdout, stderr = bench.communicate(timeout=240)
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
    assert set(runs) == set(SMOKE) and len(result["runs"]) == len(SMOKE)
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

        bulk = run["tests"]["udpbulk"]
        assert bulk["payload_bytes"] == 1400
        assert bulk["delivered_bps"] > 0 and bulk["delivered_pps"] > 0
        assert 0 <= bulk["lost_percent"] <= 100
        rr = run["tests"]["rr"]
        assert rr["round_trip"] is True and rr["observations"] > 0 and rr["mean_us"] > 0
        assert 0 < rr["min_us"] <= rr["p50_us"] <= rr["p99_us"] <= rr["p999_us"] <= rr["max_us"], rr
        for test in ("udp", "udpbulk"):  # the kernel's queue drops and the daemons' own, apart
            rec = run["tests"][test]
            assert rec["kernel_drops_total"] >= 0 and set(rec["kernel_drops"]) == {"h1", "h2"}
            if BY_NAME[name].kernel:
                assert rec["daemon_drops_total"] is None, (name, test)  # no fast path counts them
            else:
                assert rec["daemon_drops_total"] >= 0 and set(rec["daemon_drops"]) == {"h1", "h2"}

        cpu = run["tests"]["tcp1"]["proxy_cpu_s"]
        if BY_NAME[name].backend is None:
            assert cpu is None and run.get("daemons") in (None, [])
            assert all(rec["cpu_s_per_gb"] is None for rec in run["tests"].values())
        else:
            assert cpu >= 0
            for test, rec in run["tests"].items():
                assert rec["moved_bytes"] > 0 and rec["cpu_s_per_gb"] >= 0, (name, test)
            assert [d["returncode"] for d in run["daemons"]] == [0, 0]
            assert run["leftovers"] == []
    for variant, row in result["summary"].items():
        for key in ("tcp1_gbps", "udpbulk_gbps", "rr_mean_us", "rr_p999_us", "udp_kernel_drops"):
            assert row[key]["n"] == 1, (variant, key)
    assert result["ratios"]["udp"]["udp-batch1"]["tcp1_gbps"] > 0
    assert result["ratios"]["udp"]["vxlan"]["rr_mean_us"] > 0
    # Issue 14's targets, judged for the userspace variants only.
    assert set(result["targets"]) == {n for n in SMOKE if not BY_NAME[n].kernel}
    for goals in result["targets"].values():
        assert set(goals) == {t.metric for t in TARGETS}
        assert all(g["met"] in (True, False) for g in goals.values()), goals

    # The table is on the terminal, and the run left no namespace behind.
    assert "udp-batch1" in stdout and "TCP x1 /vxlan" in stdout and "rr p99.9 us" in stdout
    assert "(>= 1.0x: " in stdout and "UDP-1400 kernel drops" in stdout
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{PREFIX}{bench.pid}-" not in netns
