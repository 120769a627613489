"""bench.profile's arithmetic: perf's report rows into buckets, buckets into CPU seconds per GB."""

from __future__ import annotations

import pytest

from bench.profile import BUCKETS, breakdown, bucket, parse_report, received_gb, render, seconds_per_gb

REPORT = """\
# Total Lost Samples: 0
#
# Samples: 23K of event 'cpu-clock:ppp'
#
# Overhead  Pid:Command  Shared Object  Symbol
# ........  ...........  .............  ......
#
     9.05%    31519:iperf3  [kernel.kallsyms]  [k] _copy_from_iter
     6.75%        0:swapper  [kernel.kallsyms]  [k] pv_native_safe_halt
     6.06%    31513:python3  [kernel.kallsyms]  [k] _copy_from_iter
     4.42%    31514:python3  [kernel.kallsyms]  [k] _copy_to_iter
     2.24%    31513:python3  _fastpath_cffi.abi3.so  [.] csum_copy_avx2
     1.53%    31515:python3  _fastpath_cffi.abi3.so  [.] sum16_avx2
     1.29%    31513:python3  [kernel.kallsyms]  [k] _raw_spin_unlock_irqrestore
     0.86%    31513:python3  _fastpath_cffi.abi3.so  [.] tun_to_udp_offload
     0.83%    31515:python3  python3.11  [.] _PyEval_EvalFrameDefault
     0.40%    31513:python3  libc.so.6  [.] __memcmp_avx2_movbe
     0.30%    777:python3  [kernel.kallsyms]  [k] _copy_to_iter
     0.10%    31513:python3  [kernel.kallsyms]  [k] ip_finish_output2
     0.20%    55:kworker/0:2  [kernel.kallsyms]  [k] worker_thread
"""
DAEMONS = frozenset({31513, 31514, 31515})


def test_rows_are_read_and_headers_skipped():
    rows = parse_report(REPORT)
    assert len(rows) == 13
    first = rows[0]
    assert (first.percent, first.tid, first.comm, first.kernel, first.symbol) == (
        9.05, 31519, "iperf3", True, "_copy_from_iter"
    )  # fmt: skip
    assert not rows[4].kernel and rows[4].dso == "_fastpath_cffi.abi3.so"


def test_every_row_lands_in_its_bucket():
    got = [bucket(row, DAEMONS) for row in parse_report(REPORT)]
    assert got == [
        "iperf3", "idle", "copies", "copies", "checksums", "checksums",
        "wakeups", "fastpath", "python", "python",
        "other",  # a python3 that is not a daemon (the bench itself)
        "kernel",
        "other",
    ]  # fmt: skip


def test_shares_add_up_and_every_bucket_is_there():
    shares = breakdown(parse_report(REPORT), DAEMONS)
    assert set(shares) == {name for name, _ in BUCKETS}
    assert shares["copies"] == pytest.approx(10.48)
    assert shares["checksums"] == pytest.approx(3.77)
    assert sum(shares.values()) == pytest.approx(34.03)


def test_seconds_per_gb_is_share_times_cpu_time_over_gigabytes():
    # 25% of 2 CPUs for 4 s is 2 CPU seconds; over 4 GB that is 0.5 s/GB.
    assert seconds_per_gb({"copies": 25.0}, cpus=2, window_s=4, gigabytes=4.0) == {"copies": 0.5}
    assert seconds_per_gb({"copies": 25.0}, cpus=2, window_s=4, gigabytes=0) == {"copies": float("inf")}


def test_only_the_sampled_window_is_counted():
    doc = {
        "intervals": [
            {"sum": {"start": float(i), "end": i + 1.0, "bytes": 10**9 * (i + 1)}} for i in range(6)
        ]
    }
    # [1, 4]: the intervals 1-2, 2-3 and 3-4 (2 + 3 + 4 GB); the first and the last are outside.
    assert received_gb(doc, 1.0, 4.0) == 9.0


def test_the_table_names_every_bucket_and_the_daemons_total():
    shares = breakdown(parse_report(REPORT), DAEMONS)
    result = {
        "variant": "udp", "gbit_s": 6.0, "window_s": 4.0, "gigabytes": 3.0, "cpus": 2, "samples": "23K",
        "shares": shares, "seconds_per_gb": seconds_per_gb(shares, 2, 4.0, 3.0),
    }  # fmt: skip
    text = render(result)
    for _, label in BUCKETS:
        assert label in text
    daemons = [line for line in text.splitlines() if line.startswith("tunproxy daemons, all")][0]
    assert daemons.split()[-2:] == ["17.7", "0.473"]  # 17.73% of 8 CPU s over 3 GB
