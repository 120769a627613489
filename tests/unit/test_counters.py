"""The counters' names come from the C struct alone; the pure descriptions cannot drift from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tunproxy import counters
from tunproxy.observer import sample_of

from .test_fastpath import NET, P2, Env, receive, udp

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def env():
    e = Env()
    yield e
    e.close()


def struct_fields() -> list[str]:
    from tunproxy.fastpath import ffi

    return [name for name, _ in ffi.typeof("struct fp_counters").fields]


def test_descriptions_cover_exactly_the_struct_fields_in_order():
    fields = struct_fields()
    assert len(fields) == 33
    assert list(counters.COUNTERS) == fields
    for name, c in counters.COUNTERS.items():
        assert c.help.endswith(".") and c.unit, name
    assert [n for n, c in counters.COUNTERS.items() if c.gauge] == ["tx_max_batch", "rx_max_batch"]


def test_drop_reasons_are_the_drop_fields_in_the_c_codes_order():
    from tunproxy.fastpath import lib

    assert [getattr(lib, f"FP_DROP_{r.upper()}") for r in counters.DROP_REASONS] == list(range(8))


def test_snapshot_has_every_field_and_splits_out_the_drops(env):
    env.fp.set_routes({NET("10.0.0.0/8"): P2})
    env.inject(udp("10.9.0.1", "10.2.0.5", size=100), udp("10.9.0.1", "11.0.0.1"))
    env.tx()
    receive(env.peers[P2], 1)
    c = env.counters()
    assert list(c.values) == struct_fields()
    assert (c.tx_packets, c.drop_no_route, c.drops["no_route"]) == (1, 1, 1)
    with pytest.raises(AttributeError, match="no attribute 'tx_packet'"):
        c.tx_packet  # noqa: B018  (a typo is an error, not a 0)
    sample = sample_of(c, 5.0)
    assert sample.totals == {k: v for k, v in c.values.items() if not k.startswith("drop_")}
    assert sample.totals["tx_packets"] == 1 and sample.drops["no_route"] == 1
    assert sample.peers[P2].tx_packets == 1


def test_bench_report_and_descriptions_load_without_the_extension():
    """A saved bench result is re-rendered on a machine that never built the C."""
    code = (
        "import sys; sys.modules['tunproxy._fastpath_cffi'] = None\n"
        "import bench.report, tunproxy.counters\n"
        "print(bench.report.parse_stats('stats: tx_packets=3 rx_packets=2 no_route=1 spoofed=0')['drops'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "{'no_route': 1, 'spoofed': 0}"
