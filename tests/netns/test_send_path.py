"""fast-csum end to end: the wire does not change.

h1 runs with it on (the default: AVX2 where the CPU has it), h2 with
--no-offload (plain), h3 with it refused (the code a CPU without AVX2 runs):
every pair carries TCP byte for byte, both ways, and a socat peer still
understands a host with it on or off.
"""

from __future__ import annotations

import pytest

from lab.netns import Lab, transfer

from .labkit import build_udp, counter, start_socat_peer, start_udp, udp_mesh
from .labkit import overlay_of as overlay

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def mixed():
    with udp_mesh({"h2": ("--no-offload",), "h3": ("--refuse", "fast-csum")}) as (hosts, procs):
        yield hosts, procs


def test_each_host_says_its_send_path(mixed):
    _, procs = mixed
    simd = "AVX2" if "avx2" in open("/proc/cpuinfo").read().split() else "portable"
    assert f"send path: fast-csum on, {simd}" in procs["h1"].output()
    assert "send path: fast-csum on, portable" in procs["h3"].output()
    assert "send path:" not in procs["h2"].output()


@pytest.mark.parametrize(
    ("src", "dst"),
    [("h1", "h2"), ("h2", "h1"), ("h1", "h3"), ("h3", "h1"), ("h3", "h2")],
    ids=["on-to-plain", "plain-to-on", "on-to-refused", "refused-to-on", "refused-to-plain"],
)
def test_tcp_transfer_is_byte_identical(mixed, src, dst):
    hosts, procs = mixed
    before = tso_segments(procs[src]) if src != "h2" else 0
    sent, received = transfer(hosts[src], hosts[dst], overlay(dst), 16 << 20)
    assert received == sent
    if src != "h2":  # the bytes went through the send path under test: TSO reads cut up
        assert counter(procs[src], "tso_segments") - before >= (16 << 20) // 1500


def tso_segments(proc) -> int:
    """The counter so far; 0 while no stats line has named it (no TSO read yet)."""
    try:
        return counter(proc, "tso_segments", wait_for_new=False)
    except AssertionError:
        return 0


@pytest.mark.parametrize("extra", [(), ("--without", "fast-csum")], ids=["on", "without"])
def test_socat_peer_both_ways(extra):
    """socat moves raw IP packets in datagrams: it sees exactly flannel's wire format."""
    with Lab() as lab:
        hosts = build_udp(lab, names=("h1", "h2"))
        proc = start_udp(hosts["h1"], "--stats-interval", "0.3", *extra, peers=("h2",))
        assert ("send path: fast-csum off" in proc.output()) == bool(extra)
        socat = start_socat_peer(hosts["h2"])
        hosts["h1"].wait_ping(overlay("h2"), timeout=10)
        for src, dst in (("h1", "h2"), ("h2", "h1")):
            sent, received = transfer(hosts[src], hosts[dst], overlay(dst), 8 << 20)
            assert received == sent
        assert counter(proc, "tso_segments") > 0
        assert socat.alive(), socat.output()
