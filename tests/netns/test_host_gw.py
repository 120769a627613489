"""The host-gw backend end to end: a route per peer via its public IP, in namespaces."""

from __future__ import annotations

import signal

import pytest

from lab.netns import Lab

from .labkit import (
    HOSTS,
    ROUTED_HOSTS,
    all_pairs_ping,
    overlay,
    reload_peers,
    routed_lab,
    routes,
    start_static,
    static_mesh,
    write_config,
)

pytestmark = pytest.mark.root

SUBNETS = {n: s for n, (_, s) in HOSTS.items()}


def lo_addresses(host) -> str:
    return host.ns.run("ip", "-4", "-o", "addr", "show", "dev", "lo").stdout


@pytest.fixture(scope="module")
def mesh():
    with Lab() as lab:
        nodes, procs = static_mesh(lab, "host-gw")
        for proc in procs.values():
            proc.wait_for("peer added: 10.100", timeout=10)
        yield lab, nodes, procs


def test_every_pair_reaches_every_other(mesh):
    _, nodes, _ = mesh
    all_pairs_ping(nodes, SUBNETS)


def test_a_route_per_peer_via_its_public_ip(mesh):
    lab, nodes, _ = mesh
    table = routes(nodes["h1"])
    for peer in ("h2", "h3"):
        ip, subnet = HOSTS[peer]
        assert (table[subnet]["gateway"], table[subnet]["dev"]) == (ip, "eth1")
    assert "10.100.0.0/16" not in table
    assert "10.100.5.0/32" in lo_addresses(nodes["h1"])
    assert "FLANNEL_MTU=1500" in (lab.workdir / "h1-subnet.env").read_text()


def test_removed_peer_is_no_longer_routed(lab):
    nodes, procs = static_mesh(lab, "host-gw")
    all_pairs_ping(nodes, SUBNETS)
    reload_peers(procs["h1"], lab, "h1", {k: v for k, v in HOSTS.items() if k != "h3"})
    procs["h1"].wait_for("peer removed: 10.100.7.0/24 via 192.0.2.13")
    assert "10.100.7.0/24" not in routes(nodes["h1"])
    assert nodes["h1"].ping("10.100.7.0").returncode != 0
    nodes["h1"].wait_ping("10.100.18.0", timeout=5)


def test_peer_behind_a_router_is_refused(lab):
    hosts = ROUTED_HOSTS
    nodes = routed_lab(lab)
    config = write_config(lab, "host-gw")
    procs = {name: start_static(nodes[name], config, hosts) for name in hosts}
    procs["h1"].wait_for(
        "peer 10.100.7.0/24 (198.51.100.13) refused: "
        "host-gw needs peers on one L2 segment; 198.51.100.13 is not in 192.0.2.0/24"
    )
    procs["h3"].wait_for("host-gw needs peers on one L2 segment; 192.0.2.11 is not in 198.51.100.0/24")
    assert "10.100.7.0/24" not in routes(nodes["h1"])
    assert not [d for d in routes(nodes["h3"]) if d.startswith("10.100.")]
    nodes["h1"].wait_ping("10.100.18.0", timeout=10)
    assert all(p.alive() for p in procs.values())


def test_deleted_route_is_restored_and_stale_one_dropped(lab):
    nodes, procs = static_mesh(lab, "host-gw")
    h1 = nodes["h1"]
    all_pairs_ping(nodes, SUBNETS)
    # A kill -9 leaves routes behind; h1 comes back without h3 as a peer.
    procs["h1"].stop(signal.SIGKILL)
    assert "10.100.7.0/24" in routes(h1)
    config = write_config(lab, "host-gw")
    again = start_static(h1, config, {k: v for k, v in HOSTS.items() if k != "h3"})
    again.wait_for("peer added: 10.100.18.0/24")
    h1.ns.ip("route", "del", "10.100.18.0/24")
    assert h1.ping("10.100.18.0").returncode != 0
    again.wait_for("route to 10.100.18.0/24 via 192.0.2.12 was missing; restored", timeout=15)
    again.wait_for("removed stale route to 10.100.7.0/24", timeout=5)
    h1.wait_ping(overlay(HOSTS["h2"][1]), timeout=5)
    assert "10.100.7.0/24" not in routes(h1)


def test_close_removes_routes_and_address(lab):
    nodes, procs = static_mesh(lab, "host-gw")
    nodes["h1"].wait_ping("10.100.18.0", timeout=10)
    assert procs["h1"].stop() == 0
    assert not [d for d in routes(nodes["h1"]) if d.startswith("10.100.")]
    assert "10.100." not in lo_addresses(nodes["h1"])


@pytest.mark.etcd
def test_etcd_mesh_all_pairs_then_a_peer_leaves(lab, request):
    server, nodes, procs, subnets = request.getfixturevalue("etcd_mesh_factory")("host-gw")
    all_pairs_ping(nodes, subnets, timeout=15)
    table = routes(nodes["h1"])
    assert table[subnets["h2"]]["gateway"] == HOSTS["h2"][0]
    procs["h3"].stop()
    server.etcdctl("del", f"/coreos.com/network/subnets/{subnets['h3'].replace('/', '-')}")
    procs["h1"].wait_for(f"peer removed: {subnets['h3']}", timeout=10)
    assert subnets["h3"] not in routes(nodes["h1"])
    assert nodes["h1"].ping(overlay(subnets["h3"])).returncode != 0
    nodes["h1"].wait_ping(overlay(subnets["h2"]), timeout=5)
