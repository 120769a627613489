"""Offload mode end to end: TSO on the TUN and UDP GSO/GRO, next to a plain host.

h1 and h3 run with offload (the default), h2 with --no-offload: the wire
format is the same, so every pair must carry TCP byte for byte, and the
counters must show that one system call carried many packets.
"""

from __future__ import annotations

import pytest

from lab.netns import transfer

from .labkit import counter, udp_mesh
from .labkit import overlay_of as overlay

pytestmark = pytest.mark.root

OFFLOAD = ("tso_packets", "tso_segments", "gso_sends", "gso_segments")
RECEIVE = ("gro_receives", "gro_segments", "tun_gso_writes", "tun_gso_segments", "rx_packets")


@pytest.fixture(scope="module")
def mixed():
    with udp_mesh({"h2": ("--no-offload",)}) as (hosts, procs):
        yield hosts, procs


def counters(proc, names) -> dict[str, int]:
    values = {name: counter(proc, name, wait_for_new=False) for name in names}
    counter(proc, names[0])  # and wait for a fresh line, so the next reading is newer
    return values


def test_modes_are_as_asked(mixed):
    _, procs = mixed
    for name in ("h1", "h3"):
        assert "offload: TUN TSO4 and checksum on, UDP GSO on, UDP GRO on" in procs[name].output()
    assert "offload:" not in procs["h2"].output()
    assert counter(procs["h2"], "tso_packets") == 0


@pytest.mark.parametrize(
    ("src", "dst"),
    [("h1", "h2"), ("h2", "h1"), ("h1", "h3"), ("h3", "h1")],
    ids=["offload-to-plain", "plain-to-offload", "offload-to-offload", "offload-to-offload-back"],
)
def test_tcp_transfer_is_byte_identical(mixed, src, dst):
    hosts, procs = mixed
    names = OFFLOAD + RECEIVE
    before = {h: counters(procs[h], names) for h in (src, dst)}
    sent, received = transfer(hosts[src], hosts[dst], overlay(dst), 24 << 20)
    assert received == sent
    after = {h: {n: counter(procs[h], n) for n in names} for h in (src, dst)}
    d = {h: {n: after[h][n] - before[h][n] for n in names} for h in (src, dst)}
    assert d[dst]["rx_packets"] >= (24 << 20) // 1500

    if src != "h2":  # an offload sender cuts TSO packets and sends trains of them
        assert d[src]["tso_packets"] > 0 and d[src]["tso_segments"] > 4 * d[src]["tso_packets"]
        assert d[src]["gso_sends"] > 0 and d[src]["gso_segments"] > 4 * d[src]["gso_sends"]
    else:
        assert all(after["h2"][n] == 0 for n in OFFLOAD)
    if dst == "h2":
        assert all(after["h2"][n] == 0 for n in RECEIVE if n != "rx_packets")
    else:  # an offload receiver writes runs of segments as one TSO packet
        assert d[dst]["tun_gso_writes"] > 0 and d[dst]["tun_gso_segments"] > 4 * d[dst]["tun_gso_writes"]
    if src != "h2" and dst != "h2":  # the trains arrive whole, through UDP_GRO
        assert d[dst]["gro_receives"] > 0 and d[dst]["gro_segments"] > 4 * d[dst]["gro_receives"]


def test_icmp_errors_from_an_offload_host(mixed):
    hosts, procs = mixed
    out = hosts["h1"].ping("10.100.99.1", count=1)
    assert "Destination Net Unreachable" in out.stdout, out.stdout
    out = hosts["h1"].ping(overlay("h3"), count=1, extra=("-t", "1"))
    assert "Time to live exceeded" in out.stdout, out.stdout


@pytest.mark.parametrize(("src", "dst"), [("h1", "h2"), ("h2", "h1"), ("h1", "h3")])
def test_fragmented_pings_cross(mixed, src, dst):
    hosts, _ = mixed
    out = hosts[src].ping(overlay(dst), count=2, extra=("-s", "4000"))
    assert out.returncode == 0, out.stdout
    assert all(p.alive() for p in mixed[1].values())
