"""A host whose subnet key is taken over in etcd moves, end to end, to a subnet of its own."""

from __future__ import annotations

import json
import re
from ipaddress import IPv4Network

import pytest

from tunproxy.subnetenv import previous_subnet

from .labkit import eventually, overlay

pytestmark = [pytest.mark.root, pytest.mark.etcd]

SUBNETS = "/coreos.com/network/subnets/"


def test_a_host_whose_subnet_is_taken_moves_to_a_new_one(etcd_mesh_factory, lab) -> None:
    """Another PublicIP written on h1's key (an operator, or a host that lost its data): h1
    acquires another subnet, applies it to its device, rewrites subnet.env, and every host
    routes to it at the new address. The taken key is left to its new owner."""
    server, nodes, procs, subnets = etcd_mesh_factory("udp")
    old = subnets["h1"]
    subnet_file = lab.workdir / "h1-subnet.env"
    assert previous_subnet(subnet_file.read_text()) == IPv4Network(old)
    taken = {"PublicIP": "192.0.2.99", "BackendType": "udp"}
    server.etcdctl("put", SUBNETS + old.replace("/", "-"), json.dumps(taken))

    def moved() -> str | None:
        found = re.findall(r"our subnet is (\S+)", procs["h1"].output())
        return found[-1] if len(found) > 1 else None

    new = eventually(moved, 30, "h1 acquires another subnet")
    assert new != old
    assert f"our subnet {old} now names 192.0.2.99 in etcd" in procs["h1"].output()
    eventually(
        lambda: previous_subnet(subnet_file.read_text()) == IPv4Network(new), 10, "subnet.env rewritten"
    )
    assert overlay(new) in nodes["h1"].ns.run("ip", "-4", "-o", "addr", "show", "tunproxy0").stdout
    value = json.loads(server.etcdctl("get", "--print-value-only", SUBNETS + new.replace("/", "-")).stdout)
    assert value["PublicIP"] == "192.0.2.11"
    still_taken = json.loads(
        server.etcdctl("get", "--print-value-only", SUBNETS + old.replace("/", "-")).stdout
    )
    assert still_taken == taken
    for name in ("h2", "h3"):
        procs[name].wait_for(f"peer added: {new}", timeout=15)
        nodes[name].wait_ping(overlay(new), timeout=10)
    nodes["h1"].wait_ping(overlay(subnets["h2"]), timeout=10)  # and h1 still reaches the others from it
    for proc in procs.values():
        assert proc.alive() and "Traceback" not in proc.output(), proc.output()
