"""c-loop (on by default): the packets move on a thread waiting in C; the event loop keeps the rest.

Byte-identical transfers between a c-loop host and one that has it off (the
wire format is the same), a socat peer, a refusal that falls back in one line,
and route changes and counters that reach the C while it waits and forwards.
"""

from __future__ import annotations

import json
import sys
import threading

import pytest

from lab.netns import Lab, transfer

from .labkit import (
    HOSTS,
    build_udp,
    counter,
    eventually,
    reload_peers,
    start_socat_peer,
    start_static,
    start_udp,
    tcp_both_ways,
    udp_pair,
    write_config,
)
from .labkit import overlay_of as overlay

pytestmark = pytest.mark.root

C_LOOP = "data path: c-loop (threads waiting in C)"
EVENT_LOOP = "data path: the event loop wakes the C"


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "plain"])
def test_c_loop_peer_and_event_loop_peer_move_tcp_byte_identical_both_ways(offload):
    extra = () if offload else ("--no-offload",)
    with udp_pair(extra, (*extra, "--without", "c-loop")) as (hosts, c_loop, event_loop):
        assert C_LOOP in c_loop.output() and EVENT_LOOP in event_loop.output()
        tcp_both_ways(hosts, 16 << 20)
        out = hosts["h2"].ping(overlay("h1"), count=5, extra=("-i", "0.05"))
        assert " 0% packet loss" in out.stdout, out.stdout
        assert c_loop.alive() and event_loop.alive()


def test_socat_is_a_peer_of_the_c_loop():
    with Lab() as lab:
        hosts = build_udp(lab, names=("h1", "h2"))
        proc = start_udp(hosts["h1"], peers=("h2",))
        socat = start_socat_peer(hosts["h2"])
        hosts["h1"].wait_ping(overlay("h2"), timeout=10)
        assert C_LOOP in proc.output()
        tcp_both_ways(hosts, 4 << 20, back_port=5202)
        assert socat.alive(), socat.output()


def test_a_refused_c_loop_falls_back_to_the_event_loop_in_one_line():
    with udp_pair(("--refuse", "c-loop")) as (hosts, refused, _):
        lines = [line for line in refused.output().splitlines() if "c-loop" in line]
        assert len(lines) == 1 and "c-loop refused (--refuse c-loop)" in lines[0], lines
        assert EVENT_LOOP in refused.output()
        sent, received = transfer(hosts["h1"], hosts["h2"], overlay("h2"), 8 << 20)
        assert received == sent


def test_routes_and_counters_reach_the_c_loop_while_it_forwards():
    """One worker waiting in C: a peer removed by SIGHUP is dropped as no_route at once, added
    back it is reached, and `tunproxy status` reads the counters, all while a stream runs."""
    with Lab() as lab:
        hosts = build_udp(lab)
        config = write_config(lab, "udp")
        procs = {name: start_static(hosts[name], config, HOSTS, "--stats-interval", "0.3") for name in HOSTS}
        h1 = procs["h1"]
        assert C_LOOP in h1.output()
        hosts["h1"].wait_ping(overlay("h3"), timeout=10)
        hosts["h1"].wait_ping(overlay("h2"), timeout=10)
        streams: list[tuple] = []
        stream = threading.Thread(  # a stream to h2 while h1's routes change
            target=lambda: streams.append(transfer(hosts["h1"], hosts["h2"], overlay("h2"), 64 << 20))
        )
        stream.start()
        try:
            no_route = counter(h1, "no_route")
            reload_peers(h1, lab, "h1", {k: v for k, v in HOSTS.items() if k != "h3"})
            eventually(lambda: "peer removed: 10.100.7.0/24" in h1.output(), 10, "h3 removed")
            hosts["h1"].ns.run(sys.executable, "-c", "import socket\n" + _SEND_TO_H3)
            eventually(lambda: counter(h1, "no_route") >= no_route + 4, 10, "4 no_route drops on h1")
            status = json.loads(
                hosts["h1"].ns.run(
                    sys.executable, "-m", "tunproxy", "status", "--json",
                    "--subnet-file", str(lab.workdir / "h1-subnet.env"),
                ).stdout
            )  # fmt: skip
            assert status["counters"]["tx_packets"] > 0, status["counters"]
            reload_peers(h1, lab, "h1", HOSTS)
            eventually(lambda: h1.output().count("peer added: 10.100.7.0/24") == 2, 10, "h3 added again")
        finally:
            stream.join(120)
        assert streams and streams[0][0] == streams[0][1]
        hosts["h1"].wait_ping(overlay("h3"), timeout=10)
        assert h1.alive()


def test_a_tun_deleted_while_the_peer_keeps_sending_is_said_once_and_made_again():
    """The C loop's TUN reads EBADFD once its device is gone, and datagrams from the peer keep
    arriving: one error line naming the device, no worker death, and the check's new TUN
    carries traffic again."""
    with Lab() as lab:
        hosts = build_udp(lab, names=("h1", "h2"))
        proc = start_udp(hosts["h1"], "--check-interval", "2", peers=("h2",))
        start_udp(hosts["h2"], peers=("h1",))
        hosts["h1"].wait_ping(overlay("h2"), timeout=10)
        pings = hosts["h2"].start("ping", "-n", "-i", "0.01", "-w", "8", overlay("h1"), name="pings")
        try:
            hosts["h1"].ns.run("ip", "link", "del", "tunproxy0")
            proc.wait_for("TUN device tunproxy0 was deleted; creating it again", timeout=10)
            hosts["h1"].wait_ping(overlay("h2"), timeout=10)
        finally:
            pings.stop()
        out = proc.output()
        assert "Traceback" not in out and "stopped" not in out, out[-3000:]
        errors = [line for line in out.splitlines() if "ERROR" in line]
        assert len(errors) == 1 and "tun->udp (tunproxy0 -> UDP 192.0.2.11:8285)" in errors[0], errors
        sent, received = transfer(hosts["h1"], hosts["h2"], overlay("h2"), 4 << 20)
        assert received == sent and proc.alive()


_SEND_TO_H3 = (
    "for p in range(40000, 40004):\n"
    "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "    s.bind(('', p)); s.sendto(b'x', ('10.100.7.1', 9)); s.close()\n"
)
