"""``--workers N``: a multi-queue TUN, SO_REUSEPORT sockets and a thread per worker, end to end.

h1 and h3 run two workers, h2 one (the event loop alone): the wire format is
the same, so every pair carries parallel TCP streams byte for byte, and the
counters a user reads are the sum over the workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading

import pytest

from lab.netns import _SINK, _SOURCE, Host, Lab, transfer

from .labkit import (
    HOSTS,
    build_udp,
    counter,
    eventually,
    kernel_counters,
    reload_peers,
    start_socat_peer,
    start_static,
    start_udp,
    udp_mesh,
    write_config,
)
from .labkit import overlay_of as overlay

pytestmark = pytest.mark.root

STEERING = "workers: 2, each with a TUN queue, a UDP socket (SO_REUSEPORT) and a thread; flow steering on"


def parallel_transfers(
    src: Host,
    dst: Host,
    address: str,
    sizes: list[int],
    port: int = 5300,
    ready: threading.Event | None = None,
) -> list[tuple]:
    """Several TCP connections at once from src to address on dst: [(sent, received)] as 'len sha256'.

    ``ready`` is set once every sink listens (the lab starts no other process after that).
    """
    payloads, sinks = [], []
    for i, size in enumerate(sizes):
        payload = os.urandom(size)
        path = src.lab.workdir / f"parallel-{port + i}"
        path.write_bytes(payload)
        payloads.append((path, f"{size} {hashlib.sha256(payload).hexdigest()}"))
        sink = dst.start(sys.executable, "-c", _SINK, address, str(port + i), "60", name=f"sink{i}")
        sink.wait_for("listening", timeout=10)
        sinks.append(sink)
    if ready is not None:
        ready.set()
    sources = [
        subprocess.Popen(src.ns.cmd(sys.executable, "-c", _SOURCE, address, str(port + i), str(path), "60"))
        for i, (path, _) in enumerate(payloads)
    ]
    try:
        for source in sources:
            assert source.wait(65) == 0
        for sink in sinks:
            sink.popen.wait(60)
    finally:
        for source in sources:
            if source.poll() is None:
                source.kill()
                source.wait()
        for sink in sinks:
            sink.stop()
    return [
        (sent, sink.output().split("\n")[1].strip()) for (_, sent), sink in zip(payloads, sinks, strict=True)
    ]


def tun_link(host: Host) -> dict:
    out = host.ns.run("ip", "-d", "-j", "link", "show", "tunproxy0", check=False)
    return json.loads(out.stdout)[0] if out.returncode == 0 else {}


@pytest.fixture(scope="module")
def mesh():
    workers = {"h1": ("--workers", "2"), "h2": ("--workers", "1"), "h3": ("--workers", "2")}
    with udp_mesh(workers) as (hosts, procs):
        yield hosts, procs


def test_workers_are_as_asked(mesh):
    hosts, procs = mesh
    for name in ("h1", "h3"):
        assert STEERING in procs[name].output()
        assert tun_link(hosts[name])["linkinfo"]["info_data"].get("multi_queue") is True
    assert "workers:" not in procs["h2"].output()
    assert not tun_link(hosts["h2"])["linkinfo"]["info_data"].get("multi_queue")


@pytest.mark.parametrize(("src", "dst"), [("h1", "h3"), ("h3", "h1"), ("h1", "h2"), ("h2", "h1")])
def test_parallel_streams_are_byte_identical_and_counted_once(mesh, src, dst):
    hosts, procs = mesh
    sizes = [(3 << 20) + 4096 * i for i in range(6)]
    before = {h: counter(procs[h], n) for h, n in ((src, "tx_bytes"), (dst, "rx_bytes"))}
    retransmits_before = kernel_counters(hosts[src], "TcpRetransSegs")
    results = parallel_transfers(hosts[src], hosts[dst], overlay(dst), sizes)
    assert all(received == sent for sent, received in results), results
    total = sum(sizes)
    after = {h: counter(procs[h], n) for h, n in ((src, "tx_bytes"), (dst, "rx_bytes"))}
    # Inner bytes: the payload, 40 bytes of headers a segment, pings and ACKs, and whatever
    # the sender sent again (streams crossing two queues at once are reordered and
    # retransmitted now and then): counted on every worker, and once (twice would be 2x).
    resent = (kernel_counters(hosts[src], "TcpRetransSegs") - retransmits_before) * 1500
    for h in (src, dst):
        assert total <= after[h] - before[h] <= total * 1.1 + resent, (h, after[h] - before[h], total, resent)


def test_status_and_drops_add_up_the_workers_and_a_deleted_tun_comes_back():
    with Lab() as lab:
        hosts = build_udp(lab, names=("h1", "h2"))
        h1 = start_udp(hosts["h1"], "--workers", "2", "--check-interval", "0.5", peers=("h2",))
        start_udp(hosts["h2"], "--workers", "2", peers=("h1",))
        hosts["h1"].wait_ping(overlay("h2"), timeout=10)
        # 16 flows to a subnet nobody leased: the TUN spreads them over its queues, both workers drop.
        hosts["h1"].ns.run(
            sys.executable,
            "-c",
            "import socket\n"
            "for p in range(40000, 40032, 2):\n"
            "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "    s.bind(('', p)); s.sendto(b'x', ('10.100.200.1', 9)); s.close()\n",
        )
        subnet_file = str(lab.workdir / "h1-subnet.env")

        def drops() -> dict:
            out = hosts["h1"].ns.run(
                sys.executable, "-m", "tunproxy", "drops", "--subnet-file", subnet_file, "--json"
            )
            return json.loads(out.stdout)

        doc = eventually(lambda: (d := drops())["recorded"] >= 16 and d, 10, "16 drops recorded")
        assert doc["recorded"] == 16
        ports = sorted(d["packet"]["sport"] for d in doc["drops"] if d["packet"].get("dport") == 9)
        assert ports == list(range(40000, 40032, 2))
        out = hosts["h1"].ns.run(
            sys.executable, "-m", "tunproxy", "status", "--subnet-file", subnet_file, "--json"
        )
        assert json.loads(out.stdout)["drops"]["no_route"]["total"] == 16

        hosts["h1"].ns.run("ip", "link", "del", "tunproxy0")
        eventually(lambda: "creating it again" in h1.output(), 10, "the TUN made again")
        hosts["h1"].wait_ping(overlay("h2"), timeout=10)
        results = parallel_transfers(hosts["h1"], hosts["h2"], overlay("h2"), [1 << 20] * 4)
        assert all(received == sent for sent, received in results)
        assert tun_link(hosts["h1"])["linkinfo"]["info_data"].get("multi_queue") is True


def test_socat_is_a_peer_of_two_workers():
    with Lab() as lab:
        hosts = build_udp(lab, names=("h1", "h2"))
        proc = start_udp(hosts["h1"], "--workers", "2", peers=("h2",))
        assert STEERING in proc.output()
        socat = start_socat_peer(hosts["h2"])
        hosts["h1"].wait_ping(overlay("h2"), timeout=10)
        sent, received = transfer(hosts["h1"], hosts["h2"], overlay("h2"), 4 << 20)
        assert received == sent
        sent, received = transfer(hosts["h2"], hosts["h1"], overlay("h1"), 4 << 20, port=5202)
        assert received == sent
        assert socat.alive(), socat.output()


def test_route_changes_reach_every_worker_while_traffic_flows():
    """A peer removed by SIGHUP is unreachable from every worker; added back, every flow reaches it."""
    with Lab() as lab:
        hosts = build_udp(lab)
        config = write_config(lab, "udp")
        procs = {
            name: start_static(hosts[name], config, HOSTS, "--workers", "2", "--stats-interval", "0.3")
            for name in HOSTS
        }
        h1 = procs["h1"]
        hosts["h1"].wait_ping(overlay("h3"), timeout=10)
        hosts["h1"].wait_ping(overlay("h2"), timeout=10)
        no_route = counter(h1, "no_route")
        sizes = [(24 << 20) + 4096 * i for i in range(4)]
        streams: list[list[tuple]] = []
        listening = threading.Event()
        background = threading.Thread(  # streams to h2 while h1's routes change
            target=lambda: streams.append(
                parallel_transfers(hosts["h1"], hosts["h2"], overlay("h2"), sizes, ready=listening)
            )
        )
        background.start()
        try:
            assert listening.wait(20)
            reload_peers(h1, lab, "h1", {k: v for k, v in HOSTS.items() if k != "h3"})
            eventually(lambda: "peer removed: 10.100.7.0/24" in h1.output(), 10, "h3 removed")
            # UDP from 16 source ports, flows the TUN spreads over its queues: every worker drops.
            hosts["h1"].ns.run(
                sys.executable,
                "-c",
                "import socket\n"
                "for p in range(40000, 40032, 2):\n"
                "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                "    s.bind(('', p)); s.sendto(b'x', ('10.100.7.1', 9)); s.close()\n",
            )
            eventually(lambda: counter(h1, "no_route") >= no_route + 16, 10, "16 no_route drops on h1")
            assert hosts["h1"].ping(overlay("h3")).returncode != 0
            reload_peers(h1, lab, "h1", HOSTS)
            eventually(lambda: h1.output().count("peer added: 10.100.7.0/24") == 2, 10, "h3 added again")
        finally:
            background.join(120)
        assert streams and all(received == sent for sent, received in streams[0]), streams
        hosts["h1"].wait_ping(overlay("h3"), timeout=10)
        results = parallel_transfers(hosts["h1"], hosts["h3"], overlay("h3"), [1 << 20] * 6)
        assert all(received == sent for sent, received in results)


def test_shutdown_leaves_no_device_and_refusal_falls_back():
    with Lab() as lab:
        hosts = build_udp(lab, names=("h1", "h2"))
        h1 = start_udp(hosts["h1"], "--workers", "2", "--refuse", "multiqueue", peers=("h2",))
        h2 = start_udp(hosts["h2"], "--workers", "2", peers=("h1",))
        assert "IFF_MULTI_QUEUE refused (--refuse multiqueue); one worker" in h1.output()
        assert "workers:" not in h1.output()
        assert not tun_link(hosts["h1"])["linkinfo"]["info_data"].get("multi_queue")
        hosts["h1"].wait_ping(overlay("h2"), timeout=10)
        results = parallel_transfers(hosts["h1"], hosts["h2"], overlay("h2"), [2 << 20, 3 << 20])
        assert all(received == sent for sent, received in results)
        for host, proc in (("h1", h1), ("h2", h2)):
            assert proc.stop(timeout=10) == 0, proc.output()[-2000:]
            assert tun_link(hosts[host]) == {}
            assert "Traceback" not in proc.output()
