"""Hosts running different backends cannot carry each other's traffic: they ignore each other, and say so."""

from __future__ import annotations

import json

import pytest

from lab.hosts import SEGMENT, UNDERLAY

from .labkit import (
    ETCD_ADDRESS,
    HOSTS,
    etcd_in_lab,
    overlay,
    routes,
    start_etcd,
    write_config,
)

pytestmark = pytest.mark.root


def overlay_routes(host) -> list[str]:
    return [d for d in routes(host) if d.startswith("10.100.")]


def test_static_vxlan_and_host_gw_ignore_each_other(lab):
    lab.segment(SEGMENT, UNDERLAY)
    (ip1, subnet1), (ip2, subnet2) = HOSTS["h1"], HOSTS["h2"]
    h1 = lab.add_host("h1", SEGMENT, ip1)
    h2 = lab.add_host("h2", SEGMENT, ip2)
    procs = {}
    for host, backend, subnet, peer in (
        (h1, "vxlan", subnet1, {"PublicIP": ip2, "Subnet": subnet2, "BackendType": "host-gw"}),
        (h2, "host-gw", subnet2, {"PublicIP": ip1, "Subnet": subnet1, "BackendType": "vxlan"}),
    ):
        peers = lab.workdir / f"{host.name}-peers.json"
        peers.write_text(json.dumps([peer]))
        config = write_config(lab, backend)
        procs[host.name] = host.tunproxy(
            "--net-config", str(config), "--subnet", subnet, "--peers-file", str(peers)
        )
    procs["h1"].wait_for(f"ignoring peer {subnet2} ({ip2}): it runs backend host-gw, we run vxlan")
    procs["h2"].wait_for(f"ignoring peer {subnet1} ({ip1}): it runs backend vxlan, we run host-gw")
    assert overlay_routes(h1) == overlay_routes(h2) == []
    assert h1.ping(overlay(subnet2)).returncode != 0
    assert h2.ping(overlay(subnet1)).returncode != 0
    assert "peer added" not in procs["h1"].output() + procs["h2"].output()


@pytest.mark.etcd
def test_etcd_config_changed_between_hosts_they_ignore_each_other(lab):
    """h1 joined while the config said host-gw; the config then became vxlan and h2 joined."""
    lab.segment(SEGMENT, UNDERLAY)
    server = etcd_in_lab(lab, "host-gw")
    try:
        h1 = lab.add_host("h1", SEGMENT, HOSTS["h1"][0])
        h2 = lab.add_host("h2", SEGMENT, HOSTS["h2"][0])
        p1, s1 = start_etcd(h1, server)
        config = {"Network": "10.100.0.0/16", "SubnetLen": 24, "Backend": {"Type": "vxlan"}}
        server.etcdctl("put", "/coreos.com/network/config", json.dumps(config))
        p2, s2 = start_etcd(h2, server)
        assert server.endpoint.startswith(f"http://{ETCD_ADDRESS}:")
        p2.wait_for(
            f"ignoring peer {s1} ({HOSTS['h1'][0]}): it runs backend host-gw, we run vxlan", timeout=10
        )
        p1.wait_for(
            f"ignoring peer {s2} ({HOSTS['h2'][0]}): it runs backend vxlan, we run host-gw", timeout=10
        )
        assert overlay_routes(h1) == overlay_routes(h2) == []
        assert h2.ping(overlay(s1)).returncode != 0
    finally:
        for proc in lab.processes:
            proc.stop(timeout=5)
        server.close()
