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
     9.05%     905    31519:iperf3  [kernel.kallsyms]  [k] _copy_from_iter
     6.75%     675        0:swapper  [kernel.kallsyms]  [k] pv_native_safe_halt
     6.06%     606    31513:python3  [kernel.kallsyms]  [k] _copy_from_iter
     4.42%     442    31514:python3  [kernel.kallsyms]  [k] _copy_to_iter
     2.24%     224    31513:python3  _fastpath_cffi.abi3.so  [.] csum_copy_avx2
     1.53%     153    31515:python3  _fastpath_cffi.abi3.so  [.] sum16_avx2
     1.29%     129    31513:python3  [kernel.kallsyms]  [k] _raw_spin_unlock_irqrestore
     0.86%      86    31513:python3  _fastpath_cffi.abi3.so  [.] tun_to_udp_offload
     0.83%      83    31515:python3  python3.11  [.] _PyEval_EvalFrameDefault
     0.40%      40    31513:python3  libc.so.6  [.] __memcmp_avx2_movbe
     0.30%      30    777:python3  [kernel.kallsyms]  [k] _copy_to_iter
     0.10%      10    31513:python3  [kernel.kallsyms]  [k] ip_finish_output2
     0.20%      20    55:kworker/0:2  [kernel.kallsyms]  [k] worker_thread
     0.01%       1    31513:python3  memfd:doublemapper (deleted)  [.] 0x00007f00deadbeef
"""
DAEMONS = frozenset({31513, 31514, 31515})


def test_rows_are_read_and_headers_skipped():
    rows = parse_report(REPORT)
    assert len(rows) == 14
    first = rows[0]
    assert (first.count, first.tid, first.comm, first.kernel, first.symbol) == (
        905, 31519, "iperf3", True, "_copy_from_iter"
    )  # fmt: skip
    assert not rows[4].kernel and rows[4].dso == "_fastpath_cffi.abi3.so"
    assert rows[-1].dso == "memfd:doublemapper (deleted)" and rows[-1].count == 1


def test_every_row_lands_in_its_bucket():
    got = [bucket(row, DAEMONS) for row in parse_report(REPORT)]
    assert got == [
        "iperf3", "idle", "copies", "copies", "checksums", "checksums",
        "wakeups", "fastpath", "python", "python",
        "other",  # a python3 that is not a daemon (the bench itself)
        "kernel",
        "other",
        "python",
    ]  # fmt: skip


def test_shares_are_of_the_sample_counts_and_add_up_to_100():
    # Counted from the samples, not perf's rounded percentages (which add up to over 100).
    shares = breakdown(parse_report(REPORT), DAEMONS)
    assert set(shares) == {name for name, _ in BUCKETS}
    total = 3404
    assert shares["copies"] == pytest.approx(100 * (606 + 442) / total)
    assert shares["checksums"] == pytest.approx(100 * (224 + 153) / total)
    assert sum(shares.values()) == pytest.approx(100)
    assert breakdown([], DAEMONS)["copies"] == 0.0


def test_seconds_per_gb_is_share_times_cpu_time_over_gigabytes():
    # 25% of 2 CPUs for 4 s is 2 CPU seconds; over 4 GB that is 0.5 s/GB.
    assert seconds_per_gb({"copies": 25.0}, cpus=2, window_s=4, gigabytes=4.0) == {"copies": 0.5}
    assert seconds_per_gb({"copies": 25.0}, cpus=2, window_s=4, gigabytes=0) == {"copies": float("inf")}


def test_the_bytes_are_what_the_server_received():
    doc = {
        "end": {
            "sum_sent": {"bytes": 9 * 10**9, "seconds": 6.0},
            "sum_received": {"bytes": 6 * 10**9, "seconds": 6.01},
        }
    }
    assert received_gb(doc) == (6.0, 6.01)
    with pytest.raises(ValueError, match="iperf3: unable to connect"):
        received_gb({"start": {}, "error": "unable to connect"})


def test_the_table_names_every_bucket_and_the_daemons_total():
    shares = breakdown(parse_report(REPORT), DAEMONS)
    result = {
        "variant": "udp", "gbit_s": 6.0, "window_s": 4.0, "gigabytes": 3.0, "cpus": 2, "samples": 3404,
        "shares": shares, "seconds_per_gb": seconds_per_gb(shares, 2, 4.0, 3.0),
    }  # fmt: skip
    text = render(result)
    for _, label in BUCKETS:
        assert label in text
    daemons = [line for line in text.splitlines() if line.startswith("tunproxy daemons, all")][0]
    assert daemons.split()[-2:] == ["52.1", "1.390"]  # 1,774 of 3,404 samples of 8 CPU s over 3 GB


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--variants", "nosuch"], "unknown variant nosuch; choose from raw,"),
        (["--variants", ","], "unknown variant ','"),
        (["--seconds", "0"], "--seconds: 0 is out of range (1-600 seconds)"),
        (["--seconds", "abc"], "--seconds: not a whole number of seconds: 'abc'"),
    ],
)
def test_bad_arguments_are_one_line_naming_the_input(argv, message, capsys):
    from bench.profile import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
