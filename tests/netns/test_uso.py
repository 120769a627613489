"""TUN USO end to end: UDP trains through the TUN both ways, next to hosts without it.

A sender in one host's namespace sends UDP with UDP_SEGMENT (trains of 15
datagrams of 1,400 bytes and a shorter last one) to a receiver behind another
host. With USO on the TUN the sending daemon reads each train whole and cuts
it (``uso_packets``), and a receiving daemon with USO writes runs of one
flow's datagrams to its TUN as one train (``tun_uso_writes``). Whatever each
side has, the receiver must get every datagram byte for byte, in order: the
wire format is unchanged, so a ``--no-offload`` host, a socat peer and a host
whose kernel (here: ``--refuse uso``) refused USO all interoperate.
"""

from __future__ import annotations

import sys

import pytest

from lab.netns import Host, Lab

from .labkit import build_udp, counter, start_socat_peer, start_udp, udp_mesh
from .labkit import overlay_of as overlay

pytestmark = pytest.mark.root

TRAINS, PER_TRAIN, SIZE, LAST = 120, 16, 1400, 700
DATAGRAMS = TRAINS * PER_TRAIN

# Receives DATAGRAMS datagrams (or stops after a quiet second), prints count, bytes, sha256.
_SINK = """
import hashlib, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind((sys.argv[1], int(sys.argv[2])))
want = int(sys.argv[3])
print("listening", flush=True)
s.settimeout(20)
h, n, size = hashlib.sha256(), 0, 0
while n < want:
    try:
        d = s.recv(65535)
    except TimeoutError:
        break
    s.settimeout(1)
    h.update(len(d).to_bytes(2, "big") + d)
    n, size = n + 1, size + len(d)
print(n, size, h.hexdigest(), flush=True)
"""

# Sends TRAINS trains with UDP_SEGMENT, numbered datagrams of random bytes; prints what the sink should.
_SOURCE = """
import hashlib, os, socket, struct, sys, time
addr, port, trains, per, size, last = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:7])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
h, n, total = hashlib.sha256(), 0, 0
for t in range(trains):
    grams = [struct.pack("!I", n + i) + os.urandom((size if i < per - 1 else last) - 4) for i in range(per)]
    s.sendmsg([b"".join(grams)], [(socket.SOL_UDP, 103, struct.pack("=H", size))], 0, (addr, port))
    for d in grams:
        h.update(len(d).to_bytes(2, "big") + d)
        total += len(d)
    n += per
    time.sleep(0.003)  # a gentle rate: the test is about bytes, not speed
print(n, total, h.hexdigest(), flush=True)
"""


def udp_transfer(src: Host, dst: Host, address: str, port: int = 5300) -> tuple[str, str]:
    """Send the trains from src to address (on dst); return (sent, received) as 'count bytes sha256'."""
    sink = dst.start(sys.executable, "-c", _SINK, address, str(port), str(DATAGRAMS), name="udp-sink")
    sink.wait_for("listening", timeout=10)
    args = (str(TRAINS), str(PER_TRAIN), str(SIZE), str(LAST))
    sent = src.ns.run(sys.executable, "-c", _SOURCE, address, str(port), *args, timeout=60).stdout.strip()
    try:
        sink.popen.wait(30)
    finally:
        sink.stop()
    return sent, sink.output().splitlines()[-1].strip()


USO = ("uso_packets", "uso_segments", "tun_uso_writes", "tun_uso_segments")


def counters(proc) -> dict[str, int]:
    """The USO counters now (0 for any not named in a stats line yet), after a fresh stats line."""
    counter(proc, "rx_packets")  # wait for a fresh line
    values = {}
    for name in USO:
        try:
            values[name] = counter(proc, name, wait_for_new=False)
        except AssertionError:
            values[name] = 0
    return values


@pytest.fixture(scope="module")
def mixed():
    """h1 and h3 with USO (the default), h2 with --no-offload."""
    with udp_mesh({"h2": ("--no-offload",)}) as (hosts, procs):
        yield hosts, procs


def test_uso_is_on_where_asked(mixed):
    _, procs = mixed
    for name in ("h1", "h3"):
        assert "UDP GRO on, TUN USO on" in procs[name].output()
        assert "TUN USO refused" not in procs[name].output()
    assert "USO" not in procs["h2"].output()


@pytest.mark.parametrize(
    ("src", "dst"),
    [("h1", "h3"), ("h3", "h1"), ("h1", "h2"), ("h2", "h1")],
    ids=["uso-to-uso", "uso-to-uso-back", "uso-to-plain", "plain-to-uso"],
)
def test_udp_trains_arrive_byte_identical(mixed, src, dst):
    hosts, procs = mixed
    before = {h: counters(procs[h]) for h in (src, dst)}
    sent, received = udp_transfer(hosts[src], hosts[dst], overlay(dst))
    assert received == sent
    after = {h: counters(procs[h]) for h in (src, dst)}
    d = {h: {n: after[h][n] - before[h][n] for n in USO} for h in (src, dst)}
    if src != "h2":  # the sender's TUN handed over the trains whole, and the daemon cut them
        assert d[src]["uso_packets"] >= TRAINS // 2
        assert d[src]["uso_segments"] >= PER_TRAIN * d[src]["uso_packets"]
    else:
        assert all(v == 0 for v in after["h2"].values())
    if dst != "h2":  # the receiver wrote runs of the flow's datagrams as one train
        assert d[dst]["tun_uso_writes"] > 0
        assert d[dst]["tun_uso_segments"] > 4 * d[dst]["tun_uso_writes"]


def test_refused_uso_falls_back_and_still_moves_udp():
    """--refuse uso: the TUN is asked for TSO4 and checksum alone, one line says so, UDP still crosses."""
    with Lab() as lab:
        hosts = build_udp(lab, names=("h1", "h2"))
        refused = start_udp(hosts["h1"], "--stats-interval", "0.3", "--refuse", "uso", peers=("h2",))
        other = start_udp(hosts["h2"], "--stats-interval", "0.3", peers=("h1",))
        hosts["h1"].wait_ping(overlay("h2"), timeout=10)
        lines = [line for line in refused.output().splitlines() if "TUN USO refused" in line]
        assert len(lines) == 1 and "--refuse uso" in lines[0], refused.output()
        assert "UDP GSO on, UDP GRO on, TUN USO off" in refused.output()
        for src, dst in (("h1", "h2"), ("h2", "h1")):
            sent, received = udp_transfer(hosts[src], hosts[dst], overlay(dst))
            assert received == sent
        assert counters(refused) == dict.fromkeys(USO, 0)
        assert counters(other)["uso_packets"] > 0 and counters(other)["tun_uso_writes"] > 0


def test_without_uso_never_asks():
    with Lab() as lab:
        hosts = build_udp(lab, names=("h1", "h2"))
        proc = start_udp(hosts["h1"], "--without", "uso", peers=("h2",))
        start_udp(hosts["h2"], peers=("h1",))
        hosts["h1"].wait_ping(overlay("h2"), timeout=10)
        assert "TUN USO off" in proc.output() and "TUN USO refused" not in proc.output()
        sent, received = udp_transfer(hosts["h2"], hosts["h1"], overlay("h1"))
        assert received == sent


def test_a_socat_peer_gets_the_trains_as_datagrams():
    """socat moves raw IP packets in UDP datagrams: the cut trains are plain packets to it, and back."""
    with Lab() as lab:
        hosts = build_udp(lab, names=("h1", "h2"))
        proc = start_udp(hosts["h1"], "--stats-interval", "0.3", peers=("h2",))
        socat = start_socat_peer(hosts["h2"])
        hosts["h1"].wait_ping(overlay("h2"), timeout=10)
        for src, dst in (("h1", "h2"), ("h2", "h1")):
            sent, received = udp_transfer(hosts[src], hosts[dst], overlay(dst))
            assert received == sent
        c = counters(proc)
        assert c["uso_packets"] > 0 and c["tun_uso_writes"] > 0
        assert socat.alive(), socat.output()
