"""Leases from a real etcd in the lab, end to end with the udp backend."""

from __future__ import annotations

import json
import time

import pytest

from lab.hosts import SEGMENT, underlay_address

from .labkit import HOSTS, all_pairs_ping, overlay, start_etcd

pytestmark = [pytest.mark.root, pytest.mark.etcd]


def test_three_hosts_with_only_endpoints_and_iface_reach_each_other(lab, etcd_mesh_factory):
    server, nodes, procs, subnets = etcd_mesh_factory("udp")
    assert len(set(subnets.values())) == 3
    all_pairs_ping(nodes, subnets)
    env = (lab.workdir / "h1-subnet.env").read_text()
    assert f"FLANNEL_SUBNET={overlay(subnets['h1'])[:-1]}1/24" in env
    assert "FLANNEL_MTU=1472" in env and "FLANNEL_NETWORK=10.100.0.0/16" in env
    keys = server.etcdctl("get", "--prefix", "--keys-only", "/coreos.com/network/subnets/").stdout.split()
    assert sorted(keys) == sorted(
        f"/coreos.com/network/subnets/{s.replace('/', '-')}" for s in subnets.values()
    )


def test_etcd_outage_loses_nothing_and_a_late_joiner_is_routed_after(lab, etcd_mesh_factory):
    server, nodes, procs, subnets = etcd_mesh_factory("udp")
    all_pairs_ping(nodes, subnets)
    h1 = nodes["h1"]
    # 14 s of pings at 5/s straddle a 10 s outage; every one must come back.
    pinger = h1.start("ping", "-n", "-c", "70", "-i", "0.2", "-W", "1", overlay(subnets["h2"]), name="ping")
    time.sleep(1)
    server.stop()
    late = lab.add_host("h4", SEGMENT, underlay_address(4))
    late_proc = late.tunproxy("--etcd-endpoints", server.endpoint)
    time.sleep(10)
    assert late_proc.alive(), late_proc.output()
    assert "our subnet is" not in late_proc.output()
    server.start()
    pinger.popen.wait(30)
    assert " 0% packet loss" in pinger.output(), pinger.output()
    late_proc.wait_for("our subnet is", timeout=30)
    late_subnet = late_proc.output().split("our subnet is ")[1].split()[0]
    h1.wait_ping(overlay(late_subnet), timeout=15)
    late.wait_ping(overlay(subnets["h3"]), timeout=15)
    for proc in procs.values():
        assert proc.alive() and "Traceback" not in proc.output()


def test_a_host_that_leaves_and_returns_keeps_its_subnet(lab, etcd_mesh_factory):
    server, nodes, procs, subnets = etcd_mesh_factory("udp")
    procs["h3"].stop()
    assert procs["h3"].popen.returncode == 0
    again, subnet = start_etcd(nodes["h3"], server)
    assert subnet == subnets["h3"]
    nodes["h1"].wait_ping(overlay(subnet), timeout=10)


def test_expired_peer_disappears_from_the_others_routes(lab, etcd_mesh_factory):
    server, nodes, procs, subnets = etcd_mesh_factory("udp")
    procs["h3"].stop()
    short, subnet = start_etcd(nodes["h3"], server, "--subnet-lease-ttl", "0.05")  # 3 s
    assert subnet == subnets["h3"]
    short.popen.kill()  # no clean exit and no renewal: only expiry removes the lease
    short.popen.wait(5)
    procs["h1"].wait_for(f"peer removed: {subnet}", timeout=15)
    assert "Net Unreachable" in nodes["h1"].ping(overlay(subnet)).stdout
    procs["h2"].wait_for(f"peer removed: {subnet}", timeout=5)


def test_leases_command_lists_every_host(lab, etcd_mesh_factory):
    server, nodes, procs, subnets = etcd_mesh_factory("udp")
    import subprocess
    import sys

    out = subprocess.run(
        lab.switch.cmd(
            sys.executable, "-m", "tunproxy", "leases", "--etcd-endpoints", server.endpoint, "--json"
        ),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    listed = {item["subnet"]: item for item in json.loads(out.stdout)}
    assert set(listed) == set(subnets.values())
    for name, subnet in subnets.items():
        assert listed[subnet]["public_ip"] == HOSTS[name][0]
        assert listed[subnet]["backend_type"] == "udp"
        assert 0 < listed[subnet]["ttl_left"] <= 24 * 3600
