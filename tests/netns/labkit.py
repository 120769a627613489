"""Shared helpers for the namespace tests: meshes of tunproxy hosts, static or from etcd.

The hosts and addresses are lab/hosts.py's; ``HOSTS`` here is its table as
``{name: (public_ip, subnet)}``, the shape the helpers and tests take.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from lab import hosts as plan
from lab.etcd import EtcdServer
from lab.hosts import ETCD_ADDRESS, NETWORK, SEGMENT, STRANGER_ADDRESS, UNDERLAY
from lab.netns import Host, Lab, Process
from tunproxy.backends.rules import vtep_mac

HOSTS = plan.pairs(plan.HOSTS)


def overlay(subnet: str) -> str:
    """What each backend puts on its device (host-gw: on lo): the subnet's first address."""
    return subnet.split("/")[0]


def eventually(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:.0f}s: {what}")
        time.sleep(0.1)


def write_config(lab: Lab, backend: str, **options: Any) -> Path:
    path = lab.workdir / f"net-conf-{backend}-{len(list(lab.workdir.iterdir()))}.json"
    path.write_text(json.dumps({"Network": NETWORK, "Backend": {"Type": backend, **options}}))
    return path


def write_peers(lab: Lab, name: str, peers: dict[str, tuple[str, str]], **extra: Any) -> Path:
    """``name``'s peers file: every host in ``peers`` but itself; ``extra`` adds fields to all entries."""
    path = lab.workdir / f"{name}-peers.json"
    entries = [{"PublicIP": ip, "Subnet": subnet, **extra} for p, (ip, subnet) in peers.items() if p != name]
    path.write_text(json.dumps(entries))
    return path


def start_static(host: Host, config: Path, hosts: dict[str, tuple[str, str]], *extra: str) -> Process:
    """tunproxy in static mode with a peers file (re-read on SIGHUP) listing the other hosts."""
    peers = write_peers(host.lab, host.name, hosts)
    proc = host.tunproxy(
        "--net-config", str(config), "--subnet", hosts[host.name][1], "--peers-file", str(peers), *extra
    )
    proc.wait_for("our subnet is", timeout=15)
    return proc


def static_mesh(
    lab: Lab, backend: str, hosts=HOSTS, **options: Any
) -> tuple[dict[str, Host], dict[str, Process]]:
    lab.segment(SEGMENT, UNDERLAY)
    nodes = {name: lab.add_host(name, SEGMENT, ip) for name, (ip, _) in hosts.items()}
    config = write_config(lab, backend, **options)
    procs = {name: start_static(nodes[name], config, hosts) for name in hosts}
    return nodes, procs


def reload_peers(proc: Process, lab: Lab, name: str, peers: dict[str, tuple[str, str]]) -> None:
    write_peers(lab, name, peers)
    proc.popen.send_signal(signal.SIGHUP)


def all_pairs_ping(nodes: dict[str, Host], subnets: dict[str, str], timeout: float = 10) -> None:
    for a, b in itertools.permutations(nodes, 2):
        nodes[a].wait_ping(overlay(subnets[b]), timeout=timeout)


def vtep_mac_of(name_or_ip: str) -> str:
    """The VtepMAC tunproxy derives for a host of HOSTS (or an address)."""
    return vtep_mac(IPv4Address(HOSTS[name_or_ip][0] if name_or_ip in HOSTS else name_or_ip))


def run_json(host: Host, *argv: str) -> Any:
    return json.loads(host.ns.run(*argv).stdout or "[]")


def routes(host: Host) -> dict[str, dict[str, Any]]:
    return {r["dst"]: r for r in run_json(host, "ip", "-j", "-4", "route", "show")}


def neighbours(host: Host, dev: str) -> dict[str, dict[str, Any]]:
    return {n["dst"]: n for n in run_json(host, "ip", "-j", "-4", "neigh", "show", "dev", dev)}


def fdb(host: Host, dev: str) -> dict[str, dict[str, Any]]:
    return {e["mac"]: e for e in run_json(host, "bridge", "-j", "fdb", "show", "dev", dev) if "dst" in e}


def link(host: Host, dev: str) -> dict[str, Any] | None:
    out = host.ns.run("ip", "-d", "-j", "link", "show", dev, check=False)
    return json.loads(out.stdout)[0] if out.returncode == 0 else None


def etcd_in_lab(lab: Lab, backend: str, **options: Any) -> EtcdServer:
    """A real etcd on the switch, reachable from br0 at ETCD_ADDRESS, with the network config."""
    lab.switch_address(SEGMENT, ETCD_ADDRESS)
    server = EtcdServer(address=ETCD_ADDRESS, ns=lab.switch, workdir=lab.workdir).start()
    config = {"Network": NETWORK, "SubnetLen": 24, "Backend": {"Type": backend, **options}}
    server.etcdctl("put", "/coreos.com/network/config", json.dumps(config))
    return server


def start_etcd(host: Host, server: EtcdServer, *extra: str) -> tuple[Process, str]:
    """tunproxy with leases in etcd; returns the process and the subnet it leased."""
    proc = host.tunproxy("--etcd-endpoints", server.endpoint, *extra)
    proc.wait_for("our subnet is", timeout=20)
    found = re.search(r"our subnet is (\S+)", proc.output())
    assert found
    return proc, found.group(1)


def overlay_of(name: str) -> str:
    """The overlay address of a host of HOSTS: its subnet's first address."""
    return overlay(HOSTS[name][1])


def build_udp(lab: Lab, names=("h1", "h2", "h3"), stranger: bool = False) -> dict[str, Host]:
    lab.segment(SEGMENT, UNDERLAY)
    hosts = {name: lab.add_host(name, SEGMENT, HOSTS[name][0]) for name in names}
    if stranger:
        hosts["h9"] = lab.add_host("h9", SEGMENT, STRANGER_ADDRESS)
    return hosts


def start_udp(host: Host, *extra: str, peers: tuple[str, ...] | None = None) -> Process:
    """tunproxy (udp backend) in static mode with --peer flags for the other hosts."""
    name = host.name
    peers = peers if peers is not None else tuple(p for p in HOSTS if p != name)
    flags = [f"--peer={HOSTS[p][0]}={HOSTS[p][1]}" for p in peers]
    proc = host.tunproxy("--network", NETWORK, "--subnet", HOSTS[name][1], *flags, *extra)
    proc.wait_for("our subnet is", timeout=15)
    return proc


def counter(proc: Process, name: str, wait_for_new: bool = True, timeout: float = 5) -> int:
    """The latest value of a counter from the daemon's periodic one-line stats (needs --stats-interval)."""
    before = proc.output().count("stats:")
    deadline = time.monotonic() + timeout
    while wait_for_new and proc.output().count("stats:") <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [line for line in proc.output().splitlines() if "stats:" in line]
    assert lines, f"no stats line yet:\n{proc.output()[-2000:]}"
    # A stats line names only the counters that changed since the one before: the
    # latest line naming this counter has its current value.
    for line in reversed(lines):
        if found := re.search(rf"\b{name}=(\d+)", line):
            return int(found.group(1))
    raise AssertionError(f"no counter {name} in any stats line: {lines[-1]}")


ROUTED_HOSTS = plan.pairs(plan.ROUTED_HOSTS)


def routed_lab(lab: Lab) -> dict[str, Host]:
    """h1 and h2 on 192.0.2.0/24, h3 on 198.51.100.0/24, a router namespace between the segments."""
    lab.segment(SEGMENT, UNDERLAY)
    lab.segment(plan.ROUTED_SEGMENT, plan.ROUTED_UNDERLAY)
    lab.add_router("r", plan.ROUTER)
    nodes = {}
    for name, (ip, _) in ROUTED_HOSTS.items():
        segment = SEGMENT if IPv4Address(ip) in IPv4Network(UNDERLAY) else plan.ROUTED_SEGMENT
        nodes[name] = lab.add_host(name, segment, ip, gateway=plan.ROUTER[segment])
    return nodes


@contextlib.contextmanager
def udp_pair(
    h1_flags: Sequence[str] = (), h2_flags: Sequence[str] = ()
) -> Iterator[tuple[dict[str, Host], Process, Process]]:
    """h1 and h2 running the udp backend with these flags, h1 already reaching h2 over the
    overlay; yields (hosts, h1's daemon, h2's daemon)."""
    with Lab() as lab:
        hosts = build_udp(lab, names=("h1", "h2"))
        first = start_udp(hosts["h1"], *h1_flags, peers=("h2",))
        second = start_udp(hosts["h2"], *h2_flags, peers=("h1",))
        hosts["h1"].wait_ping(overlay_of("h2"), timeout=10)
        yield hosts, first, second


def tcp_both_ways(hosts: Mapping[str, Host], size: int, back_port: int | None = None) -> None:
    """``size`` bytes of TCP from h1 to h2, then from h2 to h1 (on ``back_port`` if given), over
    the overlay: each must arrive byte for byte."""
    from lab.netns import transfer

    sent, received = transfer(hosts["h1"], hosts["h2"], overlay_of("h2"), size)
    assert received == sent, "h1 -> h2"
    extra = {} if back_port is None else {"port": back_port}
    sent, received = transfer(hosts["h2"], hosts["h1"], overlay_of("h1"), size, **extra)
    assert received == sent, "h2 -> h1"


def kernel_counters(host: Host, *names: str) -> int:
    """The sum of kernel counters (SNMP MIB names, as nstat prints them, e.g. TcpRetransSegs)
    in the host's namespace, absolute since the namespace was made."""
    out = host.ns.run("nstat", "-az", "-j", *names).stdout
    return sum(int(json.loads(out)["kernel"].get(name, 0)) for name in names)


@contextlib.contextmanager
def udp_mesh(
    extra: Mapping[str, Sequence[str]] | None = None, stats: str = "0.3"
) -> Iterator[tuple[dict[str, Host], dict[str, Process]]]:
    """h1, h2 and h3 running the udp backend, each with its ``extra`` flags, every pair
    already reaching every other over the overlay; yields (hosts, procs)."""
    from lab.netns import Lab

    with Lab() as lab:
        hosts = build_udp(lab)
        procs = {
            name: start_udp(hosts[name], "--stats-interval", stats, *(extra or {}).get(name, ()))
            for name in HOSTS
        }
        for a, b in itertools.permutations(HOSTS, 2):
            hosts[a].wait_ping(overlay_of(b), timeout=10)
        yield hosts, procs


def start_socat_peer(host: Host) -> Process:
    """``host`` (h2) as a peer that is nothing but socat moving raw IP packets in UDP datagrams:
    flannel's wire format, no tunproxy; its peer is h1."""
    return host.start(
        "socat",
        "TUN:10.100.18.0/16,tun-name=socat0,iff-no-pi,iff-up",
        "UDP-DATAGRAM:192.0.2.11:8285,bind=192.0.2.12:8285",
        name="socat",
    )
