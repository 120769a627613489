"""The udp backend end to end: real TUN devices, namespaces, tunproxy processes."""

from __future__ import annotations

import itertools
import json
import os
import re
import sys

import pytest

from lab.netns import Lab, transfer
from tests.support import packets

from .labkit import HOSTS, build_udp, counter, eventually, start_socat_peer, start_udp
from .labkit import overlay_of as overlay

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def mesh():
    """Three hosts running tunproxy with each other as peers, plus h9, a host that is no peer."""
    with Lab() as lab:
        hosts = build_udp(lab, stranger=True)
        procs = {name: start_udp(hosts[name], "--stats-interval", "0.5") for name in HOSTS}
        yield lab, hosts, procs


def test_every_pair_reaches_every_other(mesh):
    _, hosts, _ = mesh
    for a, b in itertools.permutations(HOSTS, 2):
        hosts[a].wait_ping(overlay(b), timeout=10)


def test_tun_device_route_and_mtu(mesh):
    _, hosts, _ = mesh
    link = json.loads(hosts["h1"].ns.run("ip", "-j", "-d", "link", "show", "tunproxy0").stdout)[0]
    assert link["mtu"] == 1500 - 28
    addrs = hosts["h1"].ns.run("ip", "-4", "-o", "addr", "show", "tunproxy0").stdout
    assert "10.100.5.0/32" in addrs
    route = hosts["h1"].ns.run("ip", "route", "show", "10.100.0.0/16").stdout
    assert "dev tunproxy0" in route


def test_tcp_transfer_arrives_byte_identical(mesh):
    _, hosts, _ = mesh
    sent, received = transfer(hosts["h1"], hosts["h2"], overlay("h2"), 24 << 20)
    assert received == sent


def test_unleased_subnet_gets_net_unreachable(mesh):
    _, hosts, procs = mesh
    before = counter(procs["h1"], "no_route")
    out = hosts["h1"].ping("10.100.99.1", count=1)
    assert "Destination Net Unreachable" in out.stdout, out.stdout
    assert counter(procs["h1"], "no_route") > before


def test_ttl_one_gets_time_exceeded(mesh):
    _, hosts, procs = mesh
    out = hosts["h1"].ping(overlay("h2"), count=1, extra=("-t", "1"))
    assert "Time to live exceeded" in out.stdout, out.stdout
    assert counter(procs["h1"], "ttl") >= 1


def _send_udp_from(host, source: str, target: str, payloads: list[bytes]) -> None:
    code = (
        "import socket,sys,json\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        "s.bind((sys.argv[1],0))\n"
        "for p in json.load(open(sys.argv[3])): s.sendto(bytes.fromhex(p),(sys.argv[2],8285))\n"
    )
    path = host.lab.workdir / f"payloads-{os.getpid()}-{len(payloads)}.json"
    path.write_text(json.dumps([p.hex() for p in payloads]))
    host.ns.run(sys.executable, "-c", code, source, target, str(path))


def test_datagram_from_a_stranger_is_dropped_and_counted(mesh):
    _, hosts, procs = mesh
    before_drop = counter(procs["h1"], "unknown_peer")
    before_rx = counter(procs["h1"], "rx_packets", wait_for_new=False)
    # A well-formed packet for h1's subnet, but from 192.0.2.99, which is nobody's peer.
    packet = packets.build_ipv4(src="10.100.7.9", dst="10.100.5.0", proto=17, payload=b"x" * 32, ttl=64)
    _send_udp_from(hosts["h9"], "192.0.2.99", "192.0.2.11", [packet] * 5)
    assert counter(procs["h1"], "unknown_peer") >= before_drop + 5
    assert counter(procs["h1"], "rx_packets", wait_for_new=False) == before_rx


_GARBAGE_SENDER = """
import json, os, socket, sys, time
garbage = [bytes.fromhex(g) for g in json.load(open(sys.argv[1]))]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("192.0.2.13", 0))
sent = 0
while not os.path.exists(sys.argv[2]):
    s.sendto(garbage[sent % len(garbage)], ("192.0.2.11", 8285))
    sent += 1
    if sent == len(garbage):
        print("sent a round", flush=True)
    time.sleep(0.001)
print("sent", sent, flush=True)
"""


def test_garbage_is_counted_while_a_transfer_keeps_going(mesh):
    """Garbage keeps arriving from a peer for the whole transfer (the sender starts before it and
    stops after it), and every datagram of it is counted malformed."""
    lab, hosts, procs = mesh
    rng = __import__("random").Random(7)
    garbage = [rng.randbytes(rng.randrange(0, 1400)) for _ in range(300)]
    garbage = [g for g in garbage if not (g and g[0] >> 4 == 4)]  # never IPv4, so always malformed
    path = lab.workdir / "garbage.json"
    path.write_text(json.dumps([g.hex() for g in garbage]))
    stop = lab.workdir / "garbage.stop"
    before = counter(procs["h1"], "malformed")
    sender = hosts["h3"].start(sys.executable, "-c", _GARBAGE_SENDER, str(path), str(stop), name="garbage")
    try:
        sender.wait_for("sent a round", timeout=10)  # a whole round of garbage before the transfer
        sent, received = transfer(hosts["h2"], hosts["h1"], overlay("h1"), 20 << 20)
        assert sender.alive(), f"the garbage stopped before the transfer ended:\n{sender.output()}"
    finally:
        stop.touch()
        sender.popen.wait(10)
    assert received == sent
    found = re.search(r"sent (\d+)", sender.output().split("sent a round")[-1])
    assert found, sender.output()
    count = int(found.group(1))
    assert count > len(garbage)
    eventually(
        lambda: counter(procs["h1"], "malformed") == before + count,
        10,
        f"h1 counts all {count} garbage datagrams malformed",
    )
    assert all(p.alive() for p in procs.values())


def test_batches_carry_many_packets_under_a_flood():
    """sendmmsg/recvmmsg calls that moved more than one message, counted afresh for this flood.

    Its own pair with --no-offload: with UDP GRO one recvmmsg message can hold many
    segments, and the receive side counts segments, so a single coalesced message
    would pass for a batch.
    """
    with Lab() as lab:
        hosts = build_udp(lab, names=("h1", "h2"))
        procs = {
            name: start_udp(hosts[name], "--no-offload", "--stats-interval", "0.5", peers=(other,))
            for name, other in (("h1", "h2"), ("h2", "h1"))
        }
        hosts["h1"].wait_ping(overlay("h2"))
        tx_before = counter(procs["h1"], "tx_multi_batches")
        rx_before = counter(procs["h2"], "rx_multi_batches")
        server = hosts["h2"].start(
            "iperf3", "-s", "-1", "--forceflush", "-B", overlay("h2"), name="iperf3-flood"
        )
        server.wait_for("Server listening")
        hosts["h1"].ns.run(
            "iperf3", "-c", overlay("h2"), "-u", "-b", "0", "-l", "64", "-t", "2", check=False, timeout=20
        )
        assert counter(procs["h1"], "tx_multi_batches") > tx_before
        assert counter(procs["h2"], "rx_multi_batches") > rx_before
        assert counter(procs["h2"], "gro_receives", wait_for_new=False) == 0  # messages, not segments


def test_stats_at_exit_and_clean_shutdown():
    with Lab() as lab:
        hosts = build_udp(lab, names=("h1", "h2"))
        proc = start_udp(hosts["h1"], peers=("h2",))
        proc.stop()
        assert proc.popen.returncode == 0, proc.output()
        assert "stats:" in proc.output()
        assert "tunproxy0" not in hosts["h1"].ns.run("ip", "link").stdout
        assert "10.100.0.0/16" not in hosts["h1"].ns.run("ip", "route").stdout
        assert "Traceback" not in proc.output()


def test_peers_file_reload_on_sighup_adds_and_removes_peers():
    with Lab() as lab:
        hosts = build_udp(lab)
        peers_file = lab.workdir / "h1-peers.json"

        def write(names):
            peers_file.write_text(
                json.dumps([{"PublicIP": HOSTS[n][0], "Subnet": HOSTS[n][1]} for n in names])
            )

        write(["h2"])
        procs = {"h1": start_udp(hosts["h1"], "--peers-file", str(peers_file), peers=())}
        procs["h2"] = start_udp(hosts["h2"])
        procs["h3"] = start_udp(hosts["h3"])
        hosts["h1"].wait_ping(overlay("h2"))
        assert "Net Unreachable" in hosts["h1"].ping(overlay("h3")).stdout

        write(["h2", "h3"])
        procs["h1"].popen.send_signal(1)  # SIGHUP
        hosts["h1"].wait_ping(overlay("h3"), timeout=5)

        write(["h3"])
        procs["h1"].popen.send_signal(1)
        procs["h1"].wait_for("peer removed: 10.100.18.0/24")
        assert "Net Unreachable" in hosts["h1"].ping(overlay("h2")).stdout
        hosts["h1"].wait_ping(overlay("h3"))

        peers_file.write_text("[{not json")
        procs["h1"].popen.send_signal(1)
        procs["h1"].wait_for("peers not reloaded")
        hosts["h1"].wait_ping(overlay("h3"))  # the old table stays in force


def test_a_deleted_tun_device_is_created_again():
    with Lab() as lab:
        hosts = build_udp(lab, names=("h1", "h2"))
        proc = start_udp(hosts["h1"], "--check-interval", "0.5", peers=("h2",))
        start_udp(hosts["h2"], peers=("h1",))
        hosts["h1"].wait_ping(overlay("h2"))
        hosts["h1"].ns.run("ip", "link", "del", "tunproxy0")
        proc.wait_for("TUN device tunproxy0 was deleted; creating it again", timeout=5)
        hosts["h1"].wait_ping(overlay("h2"), timeout=5)
        assert "10.100.0.0/16 dev tunproxy0" in hosts["h1"].ns.run("ip", "route").stdout
        proc.stop()
        assert proc.popen.returncode == 0 and "Traceback" not in proc.output()


def test_data_path_errors_of_a_deleted_tun_name_the_device():
    with Lab() as lab:
        hosts = build_udp(lab, names=("h1", "h2"))
        proc = start_udp(hosts["h1"], "--check-interval", "3600", peers=("h2",))
        start_udp(hosts["h2"], peers=("h1",))
        hosts["h1"].wait_ping(overlay("h2"))
        hosts["h1"].ns.run("ip", "link", "del", "tunproxy0")  # our fd now reads EBADFD
        proc.wait_for("ERROR tun->udp (tunproxy0 -> UDP 192.0.2.11:8285): ", timeout=5)
        errors = [line for line in proc.output().splitlines() if "ERROR" in line]
        assert errors and all("tunproxy0" in line for line in errors), errors
        assert proc.alive()
        proc.stop()


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "plain"])
def test_socat_is_a_peer_flannels_wire_format(offload):
    """A peer that is nothing but socat moving raw IP packets in UDP datagrams interoperates."""
    with Lab() as lab:
        hosts = build_udp(lab, names=("h1", "h2"))
        extra = () if offload else ("--no-offload",)
        start_udp(hosts["h1"], *extra, peers=("h2",))
        socat = start_socat_peer(hosts["h2"])
        hosts["h1"].wait_ping(overlay("h2"), timeout=10)
        sent, received = transfer(hosts["h1"], hosts["h2"], overlay("h2"), 4 << 20)
        assert received == sent
        assert socat.alive(), socat.output()
