"""A flannel user's flags, environment and configs, in namespaces: interface choice, vxlan MTU, restarts.

The interface tests use one host with two interfaces: ``eth1`` on a
management segment (10.250.0.0/24) holding the default route, and ``eth2`` on
the underlay 192.0.2.0/24, from which 198.51.100.0/24 is reached through a
router. The log line ``backend udp on <iface> (<address>)`` says what was chosen.
"""

from __future__ import annotations

import re
import signal
import sys

import pytest

from lab.hosts import ROUTED_SEGMENT, ROUTED_UNDERLAY, ROUTER, SEGMENT, UNDERLAY
from lab.netns import Host, Lab, Process

from .labkit import (
    HOSTS,
    ROUTED_HOSTS,
    fdb,
    link,
    neighbours,
    routes,
    start_static,
    static_mesh,
    vtep_mac_of,
    write_config,
)

pytestmark = pytest.mark.root

STATIC = ["--network", "10.100.0.0/16", "--subnet", "10.100.5.0/24", "--subnet-file", ""]


@pytest.fixture(scope="module")
def two_nics():
    """h1: eth1 10.250.0.11 (default route), eth2 192.0.2.11; h3 198.51.100.13 behind router r."""
    with Lab() as lab:
        lab.segment("brm", "10.250.0.0/24")
        lab.segment(SEGMENT, UNDERLAY)
        lab.segment(ROUTED_SEGMENT, ROUTED_UNDERLAY)
        lab.add_router("r", ROUTER)
        h1 = lab.add_host("h1", "brm", "10.250.0.11", gateway="10.250.0.1")
        lab.attach(h1.ns, SEGMENT, HOSTS["h1"][0], "eth2")
        h1.ns.ip("route", "add", "198.51.100.0/24", "via", "192.0.2.1")
        h1.ns.ip("route", "add", "unreachable", "198.51.100.200/32")  # for --iface-can-reach to miss
        h3 = lab.add_host("h3", ROUTED_SEGMENT, ROUTED_HOSTS["h3"][0], gateway=ROUTER[ROUTED_SEGMENT])
        yield lab, h1, h3


def run_tunproxy(host: Host, *argv: str, env: tuple[str, ...] = ()) -> Process:
    """``tunproxy run`` with exactly these flags (Host.tunproxy would add --iface eth1)."""
    return host.start("env", *env, sys.executable, "-m", "tunproxy", "run", *argv, name="tunproxy")


def chosen_underlay(host: Host, *argv: str, env: tuple[str, ...] = ()) -> tuple[str, str]:
    """Start, read the interface and address it chose, stop cleanly."""
    proc = run_tunproxy(host, *STATIC, *argv, env=env)
    try:
        proc.wait_for("our subnet is", timeout=15)
        found = re.search(r"backend udp on (\S+) \((\S+)\)", proc.output())
        assert found, proc.output()
        return found.group(1), found.group(2)
    finally:
        assert proc.stop() == 0, proc.output()


@pytest.mark.parametrize(
    "argv, expected",
    [
        ((), ("eth1", "10.250.0.11")),  # no choice: the default route's, as flannel
        (("--iface", "192.0.2.11"), ("eth2", "192.0.2.11")),  # by IP: the interface holding it
        (("--iface", "eth2"), ("eth2", "192.0.2.11")),  # by name
        (("--iface", "eth9", "--iface", "192.0.2.99", "--iface", "eth2"), ("eth2", "192.0.2.11")),
        (("--iface", "eth2", "--iface", "eth1"), ("eth2", "192.0.2.11")),  # the first that resolves
        (("--iface-regex", r"^192\.0\.2\."), ("eth2", "192.0.2.11")),  # addresses first
        (("--iface-regex", "h2$"), ("eth2", "192.0.2.11")),  # then names
        (("--iface-regex", "^nope", "--iface-regex", "^10[.]250"), ("eth1", "10.250.0.11")),
        (("--iface-regex", "^eth2$", "--iface", "eth1"), ("eth1", "10.250.0.11")),  # --iface before
        (("--iface-can-reach", "198.51.100.13"), ("eth2", "192.0.2.11")),  # ip route get
        (("--iface-can-reach", "198.51.100.13", "--iface-regex", "^eth1$"), ("eth1", "10.250.0.11")),
    ],
)
def test_interface_is_chosen_as_flannel_chooses(two_nics, argv, expected):
    _, h1, _ = two_nics
    assert chosen_underlay(h1, *argv) == expected


def test_interface_from_flanneld_variables(two_nics):
    _, h1, _ = two_nics
    assert chosen_underlay(h1, env=("FLANNELD_IFACE=192.0.2.11",)) == ("eth2", "192.0.2.11")
    # TUNPROXY_ wins over FLANNELD_, the command line over both.
    env = ("FLANNELD_IFACE=eth2", "TUNPROXY_IFACE=eth1")
    assert chosen_underlay(h1, env=env) == ("eth1", "10.250.0.11")
    assert chosen_underlay(h1, "--iface", "eth2", env=env) == ("eth2", "192.0.2.11")


def test_no_interface_matches_is_one_line_naming_what_was_tried(two_nics):
    _, h1, _ = two_nics
    tries = ("--iface", "eth9", "--iface-regex", "^nope", "--iface-can-reach", "198.51.100.200")
    proc = run_tunproxy(h1, *STATIC, *tries)
    assert proc.popen.wait(15) == 2
    lines = proc.output().strip().splitlines()
    assert "Traceback" not in proc.output()
    assert lines[-1].startswith("tunproxy: error: no interface matches: --iface eth9: ")
    assert "--iface-regex ^nope: pattern '^nope' matches no interface name or address" in lines[-1]
    assert "--iface-can-reach 198.51.100.200: no route to 198.51.100.200" in lines[-1]


def test_iface_can_reach_carries_traffic_through_a_router(two_nics):
    lab, h1, h3 = two_nics
    a = run_tunproxy(
        h1, *STATIC, "--iface-can-reach", "198.51.100.13", "--peer", "198.51.100.13=10.100.7.0/24"
    )
    b = h3.tunproxy(
        "--network", "10.100.0.0/16", "--subnet", "10.100.7.0/24", "--peer", "192.0.2.11=10.100.5.0/24"
    )
    try:
        a.wait_for("our subnet is", timeout=15)
        b.wait_for("our subnet is", timeout=15)
        assert "backend udp on eth2 (192.0.2.11)" in a.output()
        h1.wait_ping("10.100.7.0", timeout=10)
        h3.wait_ping("10.100.5.0", timeout=10)
    finally:
        a.stop()
        b.stop()


# --- vxlan MTU: flannel's MTU is the encapsulated packets' -------------------------------------------


@pytest.mark.parametrize("mtu, device", [(1400, 1350), (1500, 1450), (None, 1450)])
def test_vxlan_mtu_is_the_encapsulated_mtu(lab, mtu, device):
    lab.segment(SEGMENT, UNDERLAY)
    h1 = lab.add_host("h1", SEGMENT, HOSTS["h1"][0])
    config = write_config(lab, "vxlan", **({"MTU": mtu} if mtu else {}))
    proc = h1.tunproxy("--net-config", str(config), "--subnet", "10.100.5.0/24")
    proc.wait_for("ready: 0 peer(s)", timeout=15)  # after subnet.env is written
    dev = link(h1, "tunproxy.1")
    assert dev is not None and dev["mtu"] == device
    assert f"FLANNEL_MTU={device}\n" in (lab.workdir / "h1-subnet.env").read_text()


# --- a killed run's leftovers are gone at start, not at the first check ------------------------------


def kill_and_restart_without_h3(lab: Lab, nodes: dict[str, Host], procs: dict[str, Process], backend: str):
    """SIGKILL h1, then start it again with only h2 as a peer and a check interval of an hour."""
    h1 = nodes["h1"]
    h1.wait_ping("10.100.7.0", timeout=10)
    procs["h1"].stop(signal.SIGKILL)
    config = write_config(lab, backend)
    again = start_static(h1, config, {k: HOSTS[k] for k in ("h1", "h2")}, "--check-interval", "3600")
    again.wait_for("ready: 1 peer(s)", timeout=15)
    return again


def test_vxlan_restart_removes_a_stale_route_fdb_and_neighbour_entry(lab):
    nodes, procs = static_mesh(lab, "vxlan")
    h1 = nodes["h1"]
    h1.wait_ping("10.100.7.0", timeout=10)
    assert vtep_mac_of("h3") in fdb(h1, "tunproxy.1")  # what the killed run will leave
    again = kill_and_restart_without_h3(lab, nodes, procs, "vxlan")
    assert "reusing tunproxy.1" in again.output()  # the device, and so its entries, survived
    assert "10.100.7.0/24" not in routes(h1)
    assert set(fdb(h1, "tunproxy.1")) == {vtep_mac_of("h2")}
    assert set(neighbours(h1, "tunproxy.1")) == {"10.100.18.0"}
    assert "removed stale FDB entry " + vtep_mac_of("h3") in again.output()
    h1.wait_ping("10.100.18.0", timeout=5)


def test_host_gw_restart_removes_a_stale_route(lab):
    nodes, procs = static_mesh(lab, "host-gw")
    h1 = nodes["h1"]
    assert routes(h1)["10.100.7.0/24"]["gateway"] == "192.0.2.13"
    again = kill_and_restart_without_h3(lab, nodes, procs, "host-gw")
    assert "10.100.7.0/24" not in routes(h1)
    assert "removed stale route to 10.100.7.0/24" in again.output()
    h1.wait_ping("10.100.18.0", timeout=5)


def test_udp_start_replaces_a_leftover_tun(lab):
    lab.segment(SEGMENT, UNDERLAY)
    h1 = lab.add_host("h1", SEGMENT, HOSTS["h1"][0])
    h2 = lab.add_host("h2", SEGMENT, HOSTS["h2"][0])
    # A persistent TUN of our name, with an overlay address of a subnet that is not ours.
    h1.ns.ip("tuntap", "add", "dev", "tunproxy0", "mode", "tun")
    h1.ns.ip("addr", "add", "10.100.99.0/32", "dev", "tunproxy0")
    h1.ns.ip("link", "set", "tunproxy0", "up")
    a = h1.tunproxy(*STATIC[:4], "--peer", "192.0.2.12=10.100.18.0/24", "--check-interval", "3600")
    b = h2.tunproxy(
        "--network", "10.100.0.0/16", "--subnet", "10.100.18.0/24", "--peer", "192.0.2.11=10.100.5.0/24"
    )
    a.wait_for("ready: 1 peer(s)", timeout=15)
    b.wait_for("ready: 1 peer(s)", timeout=15)
    addrs = h1.ns.run("ip", "-4", "-o", "addr", "show", "dev", "tunproxy0").stdout
    assert "10.100.5.0/32" in addrs and "10.100.99.0" not in addrs
    h1.wait_ping("10.100.18.0", timeout=10)
    assert a.stop() == 0
    assert link(h1, "tunproxy0") is None  # ours was not persistent: it went with us


def test_vxlan_check_removes_stray_entries_and_keeps_the_peers(lab):
    nodes, procs = static_mesh(lab, "vxlan", hosts={k: HOSTS[k] for k in ("h1", "h2")})
    h1 = nodes["h1"]
    h1.wait_ping("10.100.18.0", timeout=10)
    procs["h1"].stop(signal.SIGKILL)
    # What a killed run (or a person) left on the device that no peer accounts for.
    stray_mac = vtep_mac_of("192.0.2.77")
    h1.ns.run(
        "bridge", "fdb", "append", stray_mac, "dev", "tunproxy.1", "dst", "192.0.2.77", "self", "permanent"
    )
    h1.ns.ip("neigh", "replace", "10.100.77.0", "lladdr", stray_mac, "dev", "tunproxy.1", "nud", "permanent")
    config = write_config(lab, "vxlan")
    again = start_static(h1, config, {k: HOSTS[k] for k in ("h1", "h2")}, "--check-interval", "3600")
    again.wait_for("ready: 1 peer(s)", timeout=15)
    assert f"removed stale neighbour entry 10.100.77.0 -> {stray_mac}" in again.output()
    assert f"removed stale FDB entry {stray_mac} -> 192.0.2.77" in again.output()
    assert set(neighbours(h1, "tunproxy.1")) == {"10.100.18.0"}
    assert set(fdb(h1, "tunproxy.1")) == {vtep_mac_of("h2")}
    h1.wait_ping("10.100.18.0", timeout=5)
