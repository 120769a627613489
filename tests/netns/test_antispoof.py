"""Anti-spoofing end to end: a peer cannot inject packets from another host's subnet.

h2 is h1's peer. A plain UDP socket on h2's public address (any port: a peer
is known by its address) sends h1 tunnel datagrams whose inner source is
h3's subnet, or nobody's; then one from h2's own subnet as a barrier. A
listener on h1's overlay address sees only the barrier (the kernel would
have delivered the others: their sources route back through the TUN), and
h1's ``spoofed`` counter moves by exactly the number sent. With
``--allow-any-source`` the ones from h3's subnet arrive.
"""

from __future__ import annotations

import json
import os
import struct
import sys

import pytest

from lab.netns import Lab
from tests.support import packets

from .labkit import HOSTS, build_udp, counter, eventually, start_udp
from .labkit import overlay_of as overlay

pytestmark = pytest.mark.root

PORT = 9999
LISTENER = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind((sys.argv[1],int(sys.argv[2])))\n"
    "s.settimeout(60); print('listening',flush=True)\n"
    "while True:\n"
    "  data,(src,_)=s.recvfrom(2048); print(src,data.decode(),flush=True)\n"
)
SENDER = (
    "import socket,sys,json\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind((sys.argv[1],0))\n"
    "for p in json.load(open(sys.argv[3])): s.sendto(bytes.fromhex(p),(sys.argv[2],8285))\n"
)


def inner_udp(src: str, dst: str, text: str) -> bytes:
    """An IPv4/UDP packet to the listener (UDP checksum 0: none, allowed over IPv4)."""
    body = text.encode()
    udp = struct.pack("!HHHH", 40000, PORT, 8 + len(body), 0) + body
    return packets.build_ipv4(src=src, dst=dst, proto=17, payload=udp, ttl=64)


def send_through_tunnel(lab: Lab, sender, public_ip: str, target: str, packets: list[bytes]) -> None:
    path = lab.workdir / f"spoof-{os.getpid()}-{len(list(lab.workdir.iterdir()))}.json"
    path.write_text(json.dumps([p.hex() for p in packets]))
    sender.ns.run(sys.executable, "-c", SENDER, public_ip, target, str(path))


@pytest.mark.parametrize("allow_any_source", [False, True], ids=["checked", "allow-any-source"])
def test_a_peer_cannot_send_from_another_hosts_subnet(allow_any_source):
    extra = ("--stats-interval", "0.3") + (("--allow-any-source",) if allow_any_source else ())
    with Lab() as lab:
        hosts = build_udp(lab, names=("h1", "h2"))
        h1 = start_udp(hosts["h1"], *extra, peers=("h2", "h3"))  # h3 is a peer nobody runs
        start_udp(hosts["h2"], peers=("h1",))
        argv = (sys.executable, "-c", LISTENER, overlay("h1"), str(PORT))
        listener = hosts["h1"].start(*argv, name="listener")
        listener.wait_for("listening")
        before = counter(h1, "spoofed")
        foreign = ["10.100.7.9", "10.100.7.10", "10.200.0.1", "10.100.5.77"]  # h3's, h3's, nobody's, h1's
        spoofed = [inner_udp(src, overlay("h1"), f"spoofed-{i}") for i, src in enumerate(foreign)]
        barrier = inner_udp("10.100.18.9", overlay("h1"), "barrier")  # inside h2's subnet
        send_through_tunnel(lab, hosts["h2"], HOSTS["h2"][0], HOSTS["h1"][0], [*spoofed, barrier])
        eventually(lambda: "barrier" in listener.output(), 10, "the barrier packet reaches h1")
        got = [line for line in listener.output().splitlines() if line != "listening"]
        after = counter(h1, "spoofed")  # a stats line written after the barrier was delivered
        if allow_any_source:
            # h3's sources route back through the TUN, so h1's kernel takes them; what it
            # makes of the other two is its own business (rp_filter, martians).
            assert {"10.100.7.9 spoofed-0", "10.100.7.10 spoofed-1"} <= set(got)
            assert got[-1] == "10.100.18.9 barrier"
            assert after == before == 0
        else:
            assert got == ["10.100.18.9 barrier"]
            assert after - before == len(spoofed)
        assert h1.alive()
