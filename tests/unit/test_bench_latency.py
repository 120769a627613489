"""The bench's issue-14 figures on fixed input: sockperf's output, drop counters, CPU per GB, targets.

The sockperf texts are real output of sockperf 3.7 (Debian's package), colour
escapes included, captured on this machine.
"""

from __future__ import annotations

import pytest

from bench import report
from bench.harness import (
    DAEMON_SOCKET_DROPS,
    daemon_drop_counters,
    drop_deltas,
    kernel_drops_total,
    parse_iperf_udp,
    parse_sockperf,
    socket_drops,
)
from bench.plan import TARGETS, TESTS, Target

# sockperf ping-pong -i 127.0.0.1 -p 11198 -t 1 --full-rtt -m 64 --client_ip 127.0.0.1
PING_PONG_FULL_RTT = (
    "sockperf: \x1b[2;35m== version #3.7-no.git == \x1b[0m\n"
    "sockperf[CLIENT] send on:sockperf: using recvfrom() to block on socket(s)\n"
    "\n"
    "[ 0] IP = 127.0.0.1       PORT = 11198 # UDP\n"
    "sockperf: Warmup stage (sending a few dummy messages)...\n"
    "sockperf: Starting test...\n"
    "sockperf: Test end (interrupted by timer)\n"
    "sockperf: Test ended\n"
    "sockperf: [Total Run] RunTime=1.000 sec; Warm up time=400 msec; "
    "SentMessages=37481; ReceivedMessages=37480\n"
    "sockperf: ========= Printing statistics for Server No: 0\n"
    "sockperf: [Valid Duration] RunTime=0.550 sec; SentMessages=19355; ReceivedMessages=19355\n"
    "sockperf: \x1b[2;35m====> avg-rtt=28.357 (std-dev=25.220)\x1b[0m\n"
    "sockperf: # dropped messages = 0; # duplicated messages = 0; # out-of-order messages = 0\n"
    "sockperf: Summary: Round trip is 28.357 usec\n"
    "sockperf: \x1b[2;35mTotal 19355 observations\x1b[0m; each percentile contains 193.55 observations\n"
    "sockperf: ---> <MAX> observation = 2485.163\n"
    "sockperf: ---> percentile 99.999 = 2485.163\n"
    "sockperf: ---> percentile 99.990 =  444.742\n"
    "sockperf: ---> percentile 99.900 =   98.594\n"
    "sockperf: ---> percentile 99.000 =   57.006\n"
    "sockperf: ---> percentile 90.000 =   32.951\n"
    "sockperf: ---> percentile 75.000 =   30.136\n"
    "sockperf: ---> percentile 50.000 =   27.952\n"
    "sockperf: ---> percentile 25.000 =   25.677\n"
    "sockperf: ---> <MIN> observation =   15.789\n"
)

# The same without --full-rtt (and --mps 2000): sockperf reports half round trips, "avg-latency".
PING_PONG_HALF = (
    "sockperf: [Total Run] RunTime=1.000 sec; Warm up time=400 msec; "
    "SentMessages=2001; ReceivedMessages=2001\n"
    "sockperf: ========= Printing statistics for Server No: 0\n"
    "sockperf: [Valid Duration] RunTime=0.550 sec; SentMessages=1100; ReceivedMessages=1100\n"
    "sockperf: \x1b[2;35m====> avg-latency=29.268 (std-dev=106.048)\x1b[0m\n"
    "sockperf: # dropped messages = 0; # duplicated messages = 0; # out-of-order messages = 0\n"
    "sockperf: Summary: Latency is 29.268 usec\n"
    "sockperf: \x1b[2;35mTotal 1100 observations\x1b[0m; each percentile contains 11.00 observations\n"
    "sockperf: ---> <MAX> observation = 1920.898\n"
    "sockperf: ---> percentile 99.999 = 1920.898\n"
    "sockperf: ---> percentile 99.990 = 1920.898\n"
    "sockperf: ---> percentile 99.900 = 1095.614\n"
    "sockperf: ---> percentile 99.000 =  505.525\n"
    "sockperf: ---> percentile 90.000 =   24.260\n"
    "sockperf: ---> percentile 75.000 =   14.291\n"
    "sockperf: ---> percentile 50.000 =   12.207\n"
    "sockperf: ---> percentile 25.000 =   10.264\n"
    "sockperf: ---> <MIN> observation =    7.724\n"
)

# No server listening: sockperf exits 0 and prints no statistics at all.
PING_PONG_NO_SERVER = (
    "sockperf: \x1b[2;35m== version #3.7-no.git == \x1b[0m\n"
    "sockperf[CLIENT] send on:sockperf: using recvfrom() to block on socket(s)\n"
    "\n"
    "[ 0] IP = 127.0.0.1       PORT = 11197 # UDP\n"
    "sockperf: Warmup stage (sending a few dummy messages)...\n"
    "sockperf: Starting test...\n"
    "sockperf: Test end (interrupted by timer)\n"
    "sockperf: Test ended\n"
    "sockperf: No messages were received from the server. Is the server down?\n"
)

# ss -uanmp in a bench host: the daemon (pid 4242) has two UDP sockets, iperf3 (pid 77) one.
SS_UDP = (
    "State  Recv-Q Send-Q Local Address:Port  Peer Address:PortProcess\n"
    'UNCONN 0      0       192.0.2.2:8285       0.0.0.0:*    users:(("python3",pid=4242,fd=9))\n'
    "\t skmem:(r0,rb4194304,t0,tb4194304,f0,w0,o0,bl0,d1500)\n"
    'UNCONN 0      0       10.100.2.0:5201      0.0.0.0:*    users:(("iperf3",pid=77,fd=5))\n'
    "\t skmem:(r213248,rb212992,t0,tb212992,f0,w0,o0,bl0,d90000)\n"
    'UNCONN 0      0       192.0.2.2:8472       0.0.0.0:*    users:(("python3",pid=4242,fd=10))\n'
    "\t skmem:(r0,rb212992,t0,tb212992,f0,w0,o0,bl0,d7)\n"
    "UNCONN 0      0       0.0.0.0:4789         0.0.0.0:*\n"
    "\t skmem:(r0,rb212992,t0,tb212992,f0,w0,o0,bl0,d3)\n"
)


def test_sockperf_round_trips_and_percentiles():
    rec = parse_sockperf(PING_PONG_FULL_RTT)
    assert rec["round_trip"] is True
    assert (rec["mean_us"], rec["std_dev_us"]) == (28.357, 25.220)
    assert (rec["p50_us"], rec["p99_us"], rec["p999_us"]) == (27.952, 57.006, 98.594)
    assert (rec["min_us"], rec["max_us"]) == (15.789, 2485.163)
    assert rec["percentiles_us"]["99.99"] == 444.742 and len(rec["percentiles_us"]) == 8
    assert rec["observations"] == 19355
    assert (rec["total_sent_messages"], rec["total_received_messages"]) == (37481, 37480)
    assert (rec["valid_seconds"], rec["valid_received_messages"]) == (0.55, 19355)
    assert (rec["dropped_messages"], rec["duplicated_messages"], rec["out_of_order_messages"]) == (0, 0, 0)
    assert rec["min_us"] <= rec["p50_us"] <= rec["p99_us"] <= rec["p999_us"] <= rec["max_us"]


def test_sockperf_without_full_rtt_says_half_round_trips():
    rec = parse_sockperf(PING_PONG_HALF)
    assert rec["round_trip"] is False
    assert (rec["mean_us"], rec["p50_us"], rec["p999_us"]) == (29.268, 12.207, 1095.614)


def test_sockperf_without_statistics_is_one_clear_error():
    with pytest.raises(ValueError, match="no avg-rtt line: .*Is the server down"):
        parse_sockperf(PING_PONG_NO_SERVER)
    with pytest.raises(ValueError, match="no output"):
        parse_sockperf("")


def test_socket_drops_of_the_daemon_only():
    assert socket_drops(SS_UDP, {4242}) == 1507
    assert socket_drops(SS_UDP, {77}) == 90000
    assert socket_drops(SS_UDP, set()) == 0
    # The daemon's socket drops are inside RcvbufErrors already: the total counts them once.
    by_host = {"h1": {"eth1 tx_dropped": 2}, "h2": {"udp RcvbufErrors": 91507, DAEMON_SOCKET_DROPS: 1507}}
    assert kernel_drops_total(by_host) == 91509


def test_daemon_drop_counters_from_status_and_their_growth():
    status = {
        "counters": {"tx_packets": 10},
        "drops": {"no_route": {"total": 3, "per_second": None}, "send": {"total": 0, "per_second": 0.0}},
    }
    assert daemon_drop_counters(status) == {"no_route": 3, "send": 0}
    # vxlan: no fast path, no counters; unknown, never "no drops".
    assert daemon_drop_counters({"counters": {}, "drops": {}}) is None
    before = {"h1": {"no_route": 3, "send": 0}, "h2": {"no_route": 0, "send": 5}}
    after = {"h1": {"no_route": 3, "send": 2}, "h2": {"no_route": 1, "send": 9}}
    assert drop_deltas(before, after) == ({"h1": {"send": 2}, "h2": {"no_route": 1, "send": 4}}, 7)
    assert drop_deltas(before, {"h1": after["h1"], "h2": None}) == ({"h1": {"send": 2}, "h2": None}, None)
    assert drop_deltas({}, {}) == ({}, None)  # raw: no daemon


def test_udp_bulk_payload_and_moved_bytes_per_test():
    doc = {
        "end": {
            "sum_sent": {"packets": 1000, "seconds": 2.0, "bytes": 1_400_000},
            "sum_received": {
                "packets": 1000,
                "lost_packets": 200,
                "lost_percent": 20.0,
                "seconds": 2.0,
                "bytes": 0,
            },
        }
    }
    rec = parse_iperf_udp(doc, payload=1400)
    assert (rec["payload_bytes"], rec["delivered_pps"], rec["delivered_bytes"]) == (1400, 400.0, 1_120_000)
    assert rec["delivered_bps"] == pytest.approx(400 * 1400 * 8)
    assert report.moved_bytes("udpbulk", rec) == 1_120_000
    # Saved before delivered_bytes existed: packets x payload.
    assert report.moved_bytes("udp", {"delivered_packets": 10, "payload_bytes": 64}) == 640
    assert report.moved_bytes("tcp1", {"received_bytes": 5e9}) == 5e9
    rr = {"total_sent_messages": 100, "total_received_messages": 99, "message_bytes": 64}
    assert report.moved_bytes("rr", rr) == 199 * 64
    assert report.moved_bytes("ping", {"transmitted": 10, "received": 9}) == 19 * 64
    assert report.moved_bytes("rr", {}) is None
    assert set(TESTS) >= {"udpbulk", "rr", "ping"}


def _run(variant: str, tcp1_gbps: float, bulk_gbps: float, rr_mean: float, rr_p999: float, cpu_gb: float):
    return {
        "round": 1,
        "variant": variant,
        "mtu": 1450,
        "tests": {
            "tcp1": {"received_bps": tcp1_gbps * 1e9, "retransmits": 0, "cpu_s_per_gb": cpu_gb},
            "udp": {
                "delivered_pps": 1e5,
                "lost_percent": 1.0,
                "daemon_drops_total": 0,
                "kernel_drops_total": 12,
            },
            "udpbulk": {
                "delivered_bps": bulk_gbps * 1e9,
                "delivered_pps": bulk_gbps * 1e9 / 8 / 1400,
                "lost_percent": 5.0,
                "daemon_drops_total": None if variant == "vxlan" else 3,
                "kernel_drops_total": 4000,
                "cpu_s_per_gb": cpu_gb * 2,
            },
            "rr": {"mean_us": rr_mean, "p50_us": rr_mean * 0.9, "p99_us": rr_mean * 2, "p999_us": rr_p999},
        },
    }


RUNS = [_run("vxlan", 10.0, 2.0, 30.0, 100.0, 0.0), _run("udp", 8.1, 1.7, 60.0, 500.0, 0.5)]


def test_targets_beside_the_ratios_against_vxlan():
    table = report.summary(RUNS)
    goals = report.target_results(table)
    assert set(goals) == {"udp"}  # kernel data paths have no target
    udp = goals["udp"]
    assert udp["tcp1_gbps"] == {
        "observed": pytest.approx(0.81),
        "baseline": "vxlan",
        "target": ">= 1.0x",
        "met": False,
    }
    assert udp["udpbulk_gbps"]["met"] is True  # 0.85x >= 0.8x
    assert udp["rr_mean_us"]["met"] is True  # 2.0x <= 2.5x
    assert udp["rr_p999_us"]["met"] is False  # 5.0x > 4.0x
    assert udp["tcp1_cpu_s_per_gb"] == {"observed": 0.5, "baseline": None, "target": "<= 0.45", "met": False}
    assert udp["udp_daemon_drops"]["met"] is True
    assert udp["tcp4_gbps"] == {"observed": None, "baseline": "vxlan", "target": ">= 0.5x", "met": None}
    assert {t.metric for t in TARGETS} == set(udp)

    text = report.tables({"runs": RUNS})
    figures, latency, cost, drops, vs_vxlan = text.split("\n\n")
    assert "UDP-1400 Gbit/s" in figures and "1.70" in figures
    assert latency.splitlines()[0].split() == ["variant", "ping", "ms", "rr", "mean", "us", "rr", "p50", "us",
                                               "rr", "p99", "us", "rr", "p99.9", "us"]  # fmt: skip
    udp_latency = next(line for line in latency.splitlines() if line.startswith("udp "))
    assert udp_latency.split()[1:] == ["-", "60.0", "54.0", "120", "500"]
    assert "0.500 (<= 0.45: no)" in cost and "1.00" in cost  # udpbulk CPU s/GB
    vx_drops = next(line for line in drops.splitlines() if line.startswith("vxlan "))
    assert vx_drops.split()[3:] == ["n/a", "12", "n/a", "4k"]  # tunproxy drops: the kernel's data path
    udp_ratios = next(line for line in vs_vxlan.splitlines() if line.startswith("udp "))
    assert "0.81x (>= 1.0x: no)" in udp_ratios
    assert "0.85x (>= 0.8x: yes)" in udp_ratios
    assert "2.00x (<= 2.5x: yes)" in udp_ratios and "5.00x (<= 4.0x: no)" in udp_ratios
    vxlan_ratios = next(line for line in vs_vxlan.splitlines() if line.startswith("vxlan "))
    assert "(" not in vxlan_ratios


def test_a_result_saved_before_the_new_tests_renders_with_dashes():
    old = {"round": 1, "variant": "udp", "mtu": 1472, "tests": {"tcp1": {"received_bps": 3e9}}}
    text = report.tables({"runs": [old]})
    parts = text.split("\n\n")
    assert len(parts) == 4  # no baseline in the run: no ratio table
    latency = parts[1].splitlines()[-1].split()
    assert latency == ["udp", "-", "-", "-", "-", "-"]
    assert report.target_results(report.summary([old]))["udp"]["tcp1_gbps"]["met"] is None


def test_target_met_by_direction():
    assert Target("x", ">=", 1.0).met(1.0) is True
    assert Target("x", ">=", 1.0).met(0.99) is False
    assert Target("x", "<=", 2.5).met(2.6) is False
    assert Target("x", "<=", 0, None).met(0) is True
    assert Target("x", "<=", 0, None).met(None) is None
    assert report.target_note(Target("x", ">=", 1.0), 0.81) == " (>= 1.0x: no)"
    assert report.target_note(Target("x", "<=", 0.45, None), None) == " (<= 0.45: ?)"
