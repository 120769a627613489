"""The bench's pure parts on fixed numbers: statistics, ratios, schedule, parsing, table formatting."""

from __future__ import annotations

import pytest

from bench import report
from bench.harness import counter_deltas, parse_iperf_tcp, parse_iperf_udp, parse_ping
from bench.plan import round_order, schedule
from bench.report import Stat


def test_summarize_median_min_max_and_missing_values():
    assert report.summarize([3.0, 1.0, 2.0]) == Stat(2.0, 1.0, 3.0, 3)
    assert report.summarize([4.0, 1.0]) == Stat(2.5, 1.0, 4.0, 2)
    assert report.summarize([None, 5.0, None]) == Stat(5.0, 5.0, 5.0, 1)
    assert report.summarize([None]) is None
    assert report.summarize([]) is None


def test_ratio_of_medians():
    assert report.ratio(Stat(3.0, 2.0, 4.0, 3), Stat(2.0, 1.0, 9.0, 3)) == pytest.approx(1.5)
    assert report.ratio(Stat(3.0, 3.0, 3.0, 1), None) is None
    assert report.ratio(None, Stat(3.0, 3.0, 3.0, 1)) is None
    assert report.ratio(Stat(3.0, 3.0, 3.0, 1), Stat(0.0, 0.0, 0.0, 1)) is None


def test_cpu_seconds_per_gb():
    assert report.cpu_seconds_per_gb(1.5, 3e9) == pytest.approx(0.5)
    assert report.cpu_seconds_per_gb(None, 3e9) is None
    assert report.cpu_seconds_per_gb(1.0, 0) is None


def test_variant_order_rotates_per_round():
    names = ("a", "b", "c")
    assert [round_order(names, r) for r in (1, 2, 3, 4)] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]
    steps = schedule(names, 2, ("x", "y"))
    assert [s.index for s in steps] == list(range(1, 13))
    assert [(s.round, s.variant, s.test) for s in steps[:4]] == [
        (1, "a", "x"),
        (1, "a", "y"),
        (1, "b", "x"),
        (1, "b", "y"),
    ]
    assert [s.variant for s in steps[6:]] == ["b", "b", "c", "c", "a", "a"]


def _run(variant: str, round_no: int, gbps: float, kpps: float, cpu: float | None, retr: int) -> dict:
    return {
        "round": round_no,
        "variant": variant,
        "mtu": {"vxlan": 1450, "raw": 1500}.get(variant, 1472),
        "tests": {
            "tcp1": {
                "received_bps": gbps * 1e9,
                "received_bytes": gbps * 1e9 / 8 * 5,
                "retransmits": retr,
                "proxy_cpu_s": cpu,
                "wall_s": 5.0,
                "kernel_drops": {"h1": {}, "h2": {"udp RcvbufErrors": 10 * round_no}},
            },
            "udp": {
                "delivered_pps": kpps * 1e3,
                "lost_percent": 10.0,
                "delivered_packets": kpps * 4e3,
                "proxy_cpu_s": None if cpu is None else cpu / 2,
            },
            "ping": {"median_ms": 0.1},
            "tcp4": {"error": "iperf3 did not finish"},
        },
        "daemons": [
            {"host": "h1", "stats": {"drops": {"tun_write": 2, "send": 0}}},
            {"host": "h2", "stats": {"drops": {"tun_write": 1, "send": 0}}},
        ]
        if cpu is not None
        else [],
    }


RUNS = [
    _run("udp-batch1", 1, 2.0, 100, 10.0, 50_000),
    _run("vxlan", 1, 30.0, 300, 0.0, 100),
    _run("udp", 1, 2.6, 210, 7.0, 40_000),
    _run("udp", 2, 3.0, 190, 8.0, 30_000),
    _run("vxlan", 2, 28.0, 280, 0.0, 120),
    _run("udp-batch1", 2, 2.2, 90, 9.0, 60_000),
    _run("udp", 3, 2.8, 200, 7.5, 35_000),
    _run("udp-batch1", 3, 1.8, 110, 11.0, 55_000),
    _run("vxlan", 3, 29.0, 290, 0.0, 80),
    _run("raw", 1, 35.0, 400, None, 10),
]


def test_summary_and_ratios_from_runs():
    table = report.summary(RUNS)
    assert list(table) == ["raw", "vxlan", "udp", "udp-batch1"]  # the bench's order, not the run's
    udp = table["udp"]
    assert udp["tcp1_gbps"].as_dict() == pytest.approx({"median": 2.8, "min": 2.6, "max": 3.0, "n": 3})
    assert udp["udp_kpps"].as_dict() == pytest.approx({"median": 200, "min": 190, "max": 210, "n": 3})
    assert table["udp"]["tcp1_retransmits"] == Stat(35_000, 30_000, 40_000, 3)
    assert table["udp"]["tcp4_gbps"] is None  # every round failed
    # 7.5 CPU s for 2.8 Gbit/s x 5 s = 1.75 GB
    assert table["udp"]["tcp1_cpu_s_per_gb"].median == pytest.approx(7.5 / 1.75)
    assert table["udp"]["tcp1_cpu_pct"].median == pytest.approx(150.0)
    assert table["udp"]["udp_cpu_us_per_pkt"].median == pytest.approx(1e6 * 3.75 / 800e3)  # round 3's
    assert table["raw"]["tcp1_cpu_s_per_gb"] is None

    rel = report.ratios(table)
    assert rel["udp"]["udp-batch1"]["tcp1_gbps"] == pytest.approx(2.8 / 2.0)
    assert rel["udp"]["udp-batch1"]["udp_kpps"] == pytest.approx(2.0)
    assert rel["udp"]["vxlan"]["tcp1_gbps"] == pytest.approx(2.8 / 29.0)
    assert rel["vxlan"]["vxlan"]["tcp1_gbps"] == pytest.approx(1.0)
    assert rel["udp"]["vxlan"]["tcp4_gbps"] is None
    assert set(report.ratios({"udp": table["udp"]})["udp"]) == set()  # no baseline in the run


def test_drop_counters_are_medians_over_rounds():
    assert report.daemon_drops(RUNS, "udp") == {"tun_write": 3}
    assert report.daemon_drops(RUNS, "raw") == {}
    assert report.kernel_drops(RUNS, "udp", "tcp1") == {"h2 udp RcvbufErrors": 20}


def test_parse_stats_line():
    line = (
        "tx_packets=2 tx_bytes=144 rx_packets=5 rx_bytes=1200 no_route=0 ttl=1 malformed=0 unknown_peer=0 "
        "too_big=0 tun_write=7 send=0 icmp_sent=0 tx_batches=2 gso_sends=3 peers=1"
    )
    stats = report.parse_stats(line)
    assert (stats["tx_packets"], stats["rx_packets"]) == (2, 5)
    assert stats["drops"] == {
        "no_route": 0,
        "ttl": 1,
        "malformed": 0,
        "unknown_peer": 0,
        "too_big": 0,
        "tun_write": 7,
        "send": 0,
    }
    assert stats["counters"]["gso_sends"] == 3 and stats["counters"]["peers"] == 1
    assert report.parse_stats("something else") == {}


@pytest.mark.parametrize(
    ("value", "count", "text"),
    [
        (None, False, "n/a"),
        (0, False, "0"),
        (35.04, False, "35.0"),
        (2.284, False, "2.28"),
        (383.4, False, "383"),
        (0.0456, False, "0.046"),
        (0.00012, False, "1.2e-04"),
        (950, True, "950"),
        (53_012, True, "53k"),
        (1_234_567, True, "1.2M"),
    ],
)
def test_fmt_number(value, count, text):
    assert report.fmt_number(value, count) == text


def test_fmt_stat_and_ratio():
    assert report.fmt_stat(Stat(2.28, 2.18, 2.45, 3)) == "2.28 (2.18-2.45)"
    assert report.fmt_stat(Stat(2.28, 2.28, 2.28, 1)) == "2.28"
    assert report.fmt_stat(Stat(53_000, 41_000, 60_200, 3), count=True) == "53k (41k-60k)"
    assert report.fmt_stat(None) == "n/a"
    assert report.fmt_ratio(1.349) == "1.35x"
    assert report.fmt_ratio(14.62) == "14.6x"
    assert report.fmt_ratio(None) == "n/a"


def test_render_grid_text_and_markdown():
    text = report.render_grid(["variant", "Gbit/s"], [["udp", "2.80"], ["udp-batch1", "12.0"]])
    assert text.splitlines() == [
        "variant     Gbit/s",
        "----------  ------",
        "udp           2.80",
        "udp-batch1    12.0",
    ]
    md = report.render_grid(["variant", "Gbit/s"], [["udp", "2.80"]], markdown=True)
    assert md.splitlines() == ["| variant | Gbit/s |", "|---|---:|", "| udp | 2.80 |"]


def test_tables_hold_every_variant_figures_and_ratios():
    result = {"runs": RUNS}
    text = report.tables(result)
    figures, latency, costs, drops, vs_vxlan, vs_batch1 = text.split("\n\n")
    assert figures.splitlines()[0].split()[:2] == ["variant", "MTU"]
    udp_row = next(line for line in figures.splitlines() if line.startswith("udp "))
    assert "2.80 (2.60-3.00)" in udp_row and "1472" in udp_row
    raw_costs = next(line for line in costs.splitlines() if line.startswith("raw "))
    assert raw_costs.split()[1:] == ["n/a"] * 8  # no daemon, no CPU figures
    udp_ratios = next(line for line in vs_vxlan.splitlines() if line.startswith("udp "))
    assert udp_ratios.split()[1:6] == ["0.10x", "(>=", "1.0x:", "no)", "-"]  # tcp4 failed every round
    udp_ratios = next(line for line in vs_batch1.splitlines() if line.startswith("udp "))
    assert udp_ratios.split()[1:3] == ["1.40x", "-"]
    assert "TCP x1 /vxlan" in vs_vxlan and "TCP x1 /batch1" in vs_batch1
    md = report.tables(result, markdown=True)
    assert md.count("| udp-batch1 |") == 6


def test_render_markdown_names_machine_and_chart():
    result = {
        "runs": RUNS,
        "machine": {"date": "2026-11-26", "cpu_model": "Xeon", "nproc": 2, "kernel": "6.1", "python": "3.11"},
        "config": {"rounds": 3, "seconds": 5, "udp_seconds": 4, "ping_count": 20, "ping_interval": 0.05},
        "source": "bench/results/x.json",
    }
    md = report.render_markdown(result, chart="results/x.png")
    assert "2026-11-26 on Xeon, 2 CPUs, Linux 6.1, Python 3.11" in md
    assert "![chart](results/x.png)" in md
    assert "bench/results/x.json" in md


def test_parse_iperf_json():
    tcp = {
        "start": {"test_start": {"num_streams": 4}},
        "intervals": [{"sum": {"bits_per_second": 1.5e9}}, {"sum": {"bits_per_second": 2.5e9}}],
        "end": {
            "sum_sent": {"bytes": 2000, "bits_per_second": 2e9, "seconds": 2.0, "retransmits": 7},
            "sum_received": {"bytes": 1900, "bits_per_second": 1.9e9, "seconds": 2.01},
        },
    }
    rec = parse_iperf_tcp(tcp)
    assert (rec["streams"], rec["received_bps"], rec["retransmits"]) == (4, 1.9e9, 7)
    assert rec["interval_bps"] == [1_500_000_000, 2_500_000_000]
    udp = {
        "start": {"test_start": {"num_streams": 1}},
        "end": {
            "sum_sent": {"packets": 1000, "seconds": 2.0, "bytes": 64000},
            "sum_received": {
                "packets": 1000,
                "lost_packets": 250,
                "lost_percent": 25.0,
                "seconds": 2.0,
                "bytes": 48000,
            },
        },
    }
    rec = parse_iperf_udp(udp)
    assert (rec["delivered_packets"], rec["delivered_pps"], rec["sent_pps"]) == (750, 375.0, 500.0)


def test_parse_ping_and_counter_deltas():
    out = (
        "64 bytes from 10.100.18.0: icmp_seq=1 ttl=64 time=0.100 ms\n"
        "64 bytes from 10.100.18.0: icmp_seq=2 ttl=64 time=0.300 ms\n"
        "64 bytes from 10.100.18.0: icmp_seq=3 ttl=64 time=0.200 ms\n"
        "4 packets transmitted, 3 received, 25% packet loss, time 150ms\n"
    )
    rec = parse_ping(out)
    assert (rec["median_ms"], rec["min_ms"], rec["max_ms"]) == (0.2, 0.1, 0.3)
    assert (rec["transmitted"], rec["received"]) == (4, 3)
    assert counter_deltas({"a": 1, "b": 5}, {"a": 1, "b": 9, "c": 2}) == {"b": 4, "c": 2}
