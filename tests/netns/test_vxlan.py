"""The vxlan backend end to end: kernel VXLAN devices in namespaces, tunproxy processes."""

from __future__ import annotations

import json
import signal

import pytest

from lab.hosts import SEGMENT, UNDERLAY
from lab.netns import Lab

from .labkit import (
    HOSTS,
    ROUTED_HOSTS,
    all_pairs_ping,
    fdb,
    link,
    neighbours,
    overlay,
    reload_peers,
    routed_lab,
    routes,
    start_static,
    static_mesh,
    vtep_mac_of,
    write_config,
)

pytestmark = pytest.mark.root

# --- static mode ---------------------------------------------------------------------------------

OPTIONS = {"VNI": 42, "Port": 4789, "GBP": True, "MTU": 1400}


@pytest.fixture(scope="module")
def mesh():
    """Three vxlan hosts on one segment with non-default options; read-only tests share it."""
    with Lab() as lab:
        nodes, procs = static_mesh(lab, "vxlan", **OPTIONS)
        for proc in procs.values():
            proc.wait_for("peer added: 10.100", timeout=10)
        yield lab, nodes, procs


def test_every_pair_reaches_every_other(mesh):
    _, nodes, _ = mesh
    all_pairs_ping(nodes, {n: s for n, (_, s) in HOSTS.items()})


def test_device_has_the_options_asked_for(mesh):
    lab, nodes, _ = mesh
    dev = link(nodes["h1"], "tunproxy.42")
    assert dev is not None
    data = dev["linkinfo"]["info_data"]
    assert dev["linkinfo"]["info_kind"] == "vxlan"
    assert (data["id"], data["port"], data.get("gbp"), data["learning"]) == (42, 4789, True, False)
    assert (data["local"], data["link"]) == ("192.0.2.11", "eth1")
    assert dev["mtu"] == 1350  # flannel's MTU is the encapsulated packets': 1400 - 50
    assert dev["address"] == vtep_mac_of("h1")
    addrs = nodes["h1"].ns.run("ip", "-4", "-o", "addr", "show", "tunproxy.42").stdout
    assert "10.100.5.0/32" in addrs
    assert "FLANNEL_MTU=1350" in (lab.workdir / "h1-subnet.env").read_text()


def test_neighbour_fdb_and_route_per_peer(mesh):
    _, nodes, _ = mesh
    neigh = neighbours(nodes["h1"], "tunproxy.42")
    entries = fdb(nodes["h1"], "tunproxy.42")
    table = routes(nodes["h1"])
    for peer in ("h2", "h3"):
        ip, subnet = HOSTS[peer]
        gateway = overlay(subnet)
        assert neigh[gateway]["lladdr"] == vtep_mac_of(peer)
        assert "PERMANENT" in neigh[gateway]["state"]
        assert entries[vtep_mac_of(peer)]["dst"] == ip
        assert "permanent" in entries[vtep_mac_of(peer)]["state"]
        route = table[subnet]
        assert (route["gateway"], route["dev"]) == (gateway, "tunproxy.42")
        assert "onlink" in route["flags"]


def test_removed_peer_is_no_longer_routed(lab):
    nodes, procs = static_mesh(lab, "vxlan")
    all_pairs_ping(nodes, {n: s for n, (_, s) in HOSTS.items()})
    reload_peers(procs["h1"], lab, "h1", {k: v for k, v in HOSTS.items() if k != "h3"})
    procs["h1"].wait_for("peer removed: 10.100.7.0/24 via 192.0.2.13")
    h1 = nodes["h1"]
    assert "10.100.7.0/24" not in routes(h1)
    assert "10.100.7.0" not in neighbours(h1, "tunproxy.1")
    assert vtep_mac_of("h3") not in fdb(h1, "tunproxy.1")
    assert h1.ping("10.100.7.0").returncode != 0
    assert nodes["h3"].ping("10.100.5.0").returncode != 0  # h1 has no way back
    h1.wait_ping("10.100.18.0", timeout=5)


def test_peer_without_vtep_mac_is_refused(lab):
    lab.segment(SEGMENT, UNDERLAY)
    h1 = lab.add_host("h1", SEGMENT, HOSTS["h1"][0])
    config = write_config(lab, "vxlan")
    peers = lab.workdir / "garbage.json"
    peers.write_text(
        json.dumps(
            [
                {"PublicIP": "192.0.2.12", "Subnet": "10.100.18.0/24", "BackendData": {"VNI": 1}},
                {"PublicIP": "192.0.2.13", "Subnet": "10.100.7.0/24", "BackendData": {"VtepMAC": "ff:ff"}},
            ]
        )
    )
    proc = h1.tunproxy("--net-config", str(config), "--subnet", "10.100.5.0/24", "--peers-file", str(peers))
    proc.wait_for("peer 10.100.18.0/24 (192.0.2.12) refused: its lease has no VtepMAC in BackendData")
    proc.wait_for("peer 10.100.7.0/24 (192.0.2.13) refused: its VtepMAC 'ff:ff' is not a MAC address")
    assert proc.alive()
    assert not {"10.100.18.0/24", "10.100.7.0/24"} & set(routes(h1))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"VNI": "seven"}, "Backend.VNI must be an integer from 0 to 16777215, not 'seven'"),
        ({"Port": 70000}, "Backend.Port must be an integer from 0 to 65535, not 70000"),
        ({"GBP": "yes"}, "Backend.GBP must be true or false, not 'yes'"),
        ({"MTU": 100}, "Backend.MTU must be an integer from 118 to 65535, not 100"),
    ],
)
def test_bad_option_is_one_line_and_exit_2(lab, options, message):
    lab.segment(SEGMENT, UNDERLAY)
    h1 = lab.add_host("h1", SEGMENT, HOSTS["h1"][0])
    config = write_config(lab, "vxlan", **options)
    proc = h1.tunproxy("--net-config", str(config), "--subnet", "10.100.5.0/24")
    assert proc.popen.wait(15) == 2
    assert f"tunproxy: error: --net-config {config}: {message}" in proc.output()
    assert "Traceback" not in proc.output()
    assert link(h1, "tunproxy.1") is None


def test_direct_routing_same_segment_plain_route_router_peer_vxlan(lab):
    hosts = ROUTED_HOSTS
    nodes = routed_lab(lab)
    config = write_config(lab, "vxlan", DirectRouting=True)
    procs = {name: start_static(nodes[name], config, hosts) for name in hosts}
    procs["h1"].wait_for("peer 10.100.18.0/24 is on 192.0.2.0/24: routed directly via 192.0.2.12")
    all_pairs_ping(nodes, {n: s for n, (_, s) in hosts.items()})

    table = routes(nodes["h1"])
    assert (table["10.100.18.0/24"]["gateway"], table["10.100.18.0/24"]["dev"]) == ("192.0.2.12", "eth1")
    assert (table["10.100.7.0/24"]["gateway"], table["10.100.7.0/24"]["dev"]) == ("10.100.7.0", "tunproxy.1")
    entries = fdb(nodes["h1"], "tunproxy.1")
    assert set(entries) == {vtep_mac_of("198.51.100.13")}
    # h3 sees both others behind the router: everything goes through VXLAN.
    table3 = routes(nodes["h3"])
    assert table3["10.100.5.0/24"]["dev"] == table3["10.100.18.0/24"]["dev"] == "tunproxy.1"


def test_restart_after_kill_reuses_or_replaces_the_device(lab):
    nodes, procs = static_mesh(lab, "vxlan", hosts={k: HOSTS[k] for k in ("h1", "h2")})
    h1 = nodes["h1"]
    h1.wait_ping("10.100.18.0", timeout=10)
    before = link(h1, "tunproxy.1")
    assert before is not None
    procs["h1"].stop(signal.SIGKILL)
    assert link(h1, "tunproxy.1") is not None  # a kill -9 leaves the device behind

    config = write_config(lab, "vxlan")
    again = start_static(h1, config, {k: HOSTS[k] for k in ("h1", "h2")})
    again.wait_for("reusing tunproxy.1")
    h1.wait_ping("10.100.18.0", timeout=10)
    after = link(h1, "tunproxy.1")
    assert after is not None
    assert (after["ifindex"], after["address"]) == (before["ifindex"], before["address"])

    again.stop(signal.SIGKILL)
    h1.ns.ip("link", "del", "tunproxy.1")
    h1.ns.ip(
        "link", "add", "tunproxy.1", "type", "vxlan", "id", "1", "dstport", "4789", "local", "192.0.2.11",
        "dev", "eth1",
    )  # fmt: skip
    third = start_static(h1, config, {k: HOSTS[k] for k in ("h1", "h2")})
    third.wait_for("replacing tunproxy.1, it does not match: port 4789 != 8472")
    h1.wait_ping("10.100.18.0", timeout=10)
    dev = link(h1, "tunproxy.1")
    assert dev is not None and dev["linkinfo"]["info_data"]["port"] == 8472


def test_device_deleted_behind_our_back_is_recreated(lab):
    nodes, procs = static_mesh(lab, "vxlan")
    all_pairs_ping(nodes, {n: s for n, (_, s) in HOSTS.items()})
    h1, h2 = nodes["h1"], nodes["h2"]
    h1.ns.ip("link", "del", "tunproxy.1")
    # Meanwhile on h2, a route like one a killed run leaves for a peer that is gone (tunproxy's proto):
    h2.ns.ip(
        "route", "add", "10.100.99.0/24", "via", "10.100.99.0", "dev", "tunproxy.1", "onlink", "proto", "116"
    )
    # and one an operator added, which is not tunproxy's to remove.
    h2.ns.ip("route", "add", "10.100.98.0/24", "via", "10.100.98.0", "dev", "tunproxy.1", "onlink")
    assert h1.ping("10.100.18.0").returncode != 0
    procs["h1"].wait_for("tunproxy.1 was gone; recreated it with 2 peer(s)", timeout=15)
    h1.wait_ping("10.100.18.0", timeout=5)
    h1.wait_ping("10.100.7.0", timeout=5)
    assert set(fdb(h1, "tunproxy.1")) == {vtep_mac_of("h2"), vtep_mac_of("h3")}
    procs["h2"].wait_for("removed stale route to 10.100.99.0/24", timeout=15)
    assert "10.100.99.0/24" not in routes(h2)
    assert "10.100.98.0/24" in routes(h2) and "stale route to 10.100.98.0/24" not in procs["h2"].output()


def test_close_removes_the_device(lab):
    nodes, procs = static_mesh(lab, "vxlan", DirectRouting=True)
    nodes["h1"].wait_ping("10.100.18.0", timeout=10)
    assert procs["h1"].stop() == 0
    assert link(nodes["h1"], "tunproxy.1") is None
    assert not [d for d in routes(nodes["h1"]) if d.startswith("10.100.")]


# --- with etcd ------------------------------------------------------------------------------------


@pytest.mark.etcd
def test_etcd_mesh_all_pairs_then_a_peer_leaves(lab, etcd_mesh_factory):
    server, nodes, procs, subnets = etcd_mesh_factory("vxlan")
    assert len(set(subnets.values())) == 3
    all_pairs_ping(nodes, subnets, timeout=15)
    lease = json.loads(
        server.etcdctl(
            "get", f"/coreos.com/network/subnets/{subnets['h2'].replace('/', '-')}", "--print-value-only"
        ).stdout
    )
    assert lease["BackendType"] == "vxlan"
    assert lease["BackendData"]["VtepMAC"] == vtep_mac_of("h2")

    # h3 leaves: stop it (its lease would outlive it) and delete its lease.
    procs["h3"].stop()
    server.etcdctl("del", f"/coreos.com/network/subnets/{subnets['h3'].replace('/', '-')}")
    procs["h1"].wait_for(f"peer removed: {subnets['h3']}", timeout=10)
    assert subnets["h3"] not in routes(nodes["h1"])
    assert vtep_mac_of("h3") not in fdb(nodes["h1"], "tunproxy.1")
    nodes["h1"].wait_ping(overlay(subnets["h2"]), timeout=5)
