"""What tunproxy owns on a host, and what it leaves alone, in namespaces.

Every route tunproxy installs carries protocol 116. At start, whatever the
backend, what an earlier run of any backend left (routes of protocol 116,
``tunproxy.*`` VXLAN devices, host-gw's address on lo) is gone before
``ready``; a route of another protocol is never replaced nor deleted.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys

import pytest

from lab.hosts import SEGMENT, UNDERLAY
from lab.netns import Host, Lab, Process

from .labkit import HOSTS, etcd_in_lab, eventually, link, start_etcd, start_static, write_config

pytestmark = pytest.mark.root

TWO = {k: HOSTS[k] for k in ("h1", "h2")}


def proto_routes(host: Host) -> list[str]:
    """tunproxy's routes on the host, as ``dst dev``."""
    out = host.ns.run("ip", "-j", "-4", "route", "show", "proto", "116").stdout
    return sorted(f"{r['dst']} {r['dev']}" for r in json.loads(out or "[]"))


def overlay_routes(host: Host) -> list[str]:
    return [line for line in host.ns.run("ip", "-4", "route").stdout.splitlines() if line.startswith("10.")]


def lo_addresses(host: Host) -> str:
    return host.ns.run("ip", "-4", "-o", "addr", "show", "dev", "lo").stdout


def mesh(lab: Lab, backend: str) -> tuple[dict[str, Host], dict[str, Process]]:
    lab.segment(SEGMENT, UNDERLAY)
    nodes = {name: lab.add_host(name, SEGMENT, ip) for name, (ip, _) in TWO.items()}
    config = write_config(lab, backend)
    procs = {name: start_static(nodes[name], config, TWO) for name in TWO}
    for proc in procs.values():
        proc.wait_for("ready: 1 peer(s)", timeout=15)
    nodes["h1"].wait_ping("10.100.18.0", timeout=10)
    return nodes, procs


@pytest.mark.parametrize("old, new", [("host-gw", "udp"), ("vxlan", "udp"), ("vxlan", "host-gw")])
def test_another_backend_after_a_kill_removes_the_old_backends_state(lab, old, new):
    nodes, procs = mesh(lab, old)
    h1, h2 = nodes["h1"], nodes["h2"]
    assert "10.100.18.0/24 " + ("eth1" if old == "host-gw" else "tunproxy.1") in proto_routes(h1)
    procs["h1"].stop(signal.SIGKILL)
    assert procs["h2"].stop() == 0
    config = write_config(lab, new)
    start_static(h2, config, TWO).wait_for("ready: 1 peer(s)", timeout=15)
    again = start_static(h1, config, TWO, "--check-interval", "3600")
    again.wait_for("ready: 1 peer(s)", timeout=15)
    # At ready, only what the new backend uses is left: no route, device or address of the old one.
    want = {"udp": ["10.100.0.0/16 tunproxy0"], "host-gw": ["10.100.18.0/24 eth1"]}[new]
    assert proto_routes(h1) == want, again.output()
    assert link(h1, "tunproxy.1") is None
    assert ("10.100.5.0/32" in lo_addresses(h1)) == (new == "host-gw")
    if old == "host-gw":
        assert "removed route 10.100.18.0/24 via 192.0.2.12 dev eth1 proto 116, left by an earlier run" in (
            again.output()
        )
        assert "removed address 10.100.5.0/32 on lo, left by an earlier run" in again.output()
    else:
        assert "removed device tunproxy.1, left by an earlier run" in again.output()
    h1.wait_ping("10.100.18.0", timeout=10)
    assert again.stop() == 0
    assert overlay_routes(h1) == [] and "10.100." not in lo_addresses(h1)


def test_a_stale_vxlan_device_of_another_vni_goes(lab):
    nodes, procs = mesh(lab, "vxlan")
    h1 = nodes["h1"]
    procs["h1"].stop(signal.SIGKILL)
    again = start_static(h1, write_config(lab, "vxlan", VNI=2), TWO, "--check-interval", "3600")
    again.wait_for("ready: 1 peer(s)", timeout=15)
    assert link(h1, "tunproxy.1") is None and link(h1, "tunproxy.2") is not None
    assert proto_routes(h1) == ["10.100.18.0/24 tunproxy.2"]


# --- routes tunproxy did not make ---------------------------------------------------------------


def run_once(host: Host, *argv: str) -> tuple[int, list[str]]:
    """``tunproxy run`` that is expected to stop by itself; its exit code and stderr lines."""
    proc = host.tunproxy(*argv)
    code = proc.popen.wait(20)
    return code, proc.output().strip().splitlines()


def test_a_network_route_tunproxy_did_not_make_is_refused_and_kept(lab):
    lab.segment(SEGMENT, UNDERLAY)
    h1 = lab.add_host("h1", SEGMENT, HOSTS["h1"][0])
    h1.ns.ip("route", "add", "10.100.0.0/16", "via", "192.0.2.1", "proto", "boot")
    code, lines = run_once(h1, "--network", "10.100.0.0/16", "--subnet", "10.100.5.0/24")
    assert code == 2 and "Traceback" not in "\n".join(lines)
    assert lines[-1].startswith("tunproxy: error: a route tunproxy did not make is in the way: ")
    assert "10.100.0.0/16 via 192.0.2.1 dev eth1 proto boot" in lines[-1]
    assert overlay_routes(h1) == ["10.100.0.0/16 via 192.0.2.1 dev eth1 "]  # ip prints no "proto boot"


def test_a_tun_name_that_is_another_kind_of_device_is_never_deleted(lab):
    """--tun-name eth1 (a typo, or a copied command line) must not take the underlay away."""
    lab.segment(SEGMENT, UNDERLAY)
    h1 = lab.add_host("h1", SEGMENT, HOSTS["h1"][0])
    argv = ("--network", "10.100.0.0/16", "--subnet", "10.100.5.0/24", "--tun-name", "eth1")
    code, lines = run_once(h1, *argv)
    assert code == 2 and "Traceback" not in "\n".join(lines)
    assert lines[-1] == (
        "tunproxy: error: --tun-name eth1 is an existing veth device, not a TUN; "
        "tunproxy will not delete it (choose another --tun-name)"
    )
    assert "192.0.2.11/24" in h1.ns.run("ip", "-4", "addr", "show", "eth1").stdout


@pytest.mark.parametrize(
    "network, subnet, fragment",
    [
        ("0.0.0.0/0", "10.100.5.0/24", "Network 0.0.0.0/0 covers every address, the default route too"),
        ("192.0.0.0/8", "192.1.5.0/24", "Network 192.0.0.0/8 contains the address 192.0.2.11 of eth1"),
    ],
)
def test_a_network_covering_the_default_route_or_the_underlay_is_refused(lab, network, subnet, fragment):
    lab.segment(SEGMENT, UNDERLAY)
    h1 = lab.add_host("h1", SEGMENT, HOSTS["h1"][0], gateway="192.0.2.1")
    before = h1.ns.run("ip", "route").stdout
    code, lines = run_once(h1, "--network", network, "--subnet", subnet)
    assert code == 2 and "Traceback" not in "\n".join(lines)
    assert lines[-1].startswith("tunproxy: error: ") and fragment in lines[-1]
    assert h1.ns.run("ip", "route").stdout == before
    assert "default via 192.0.2.1" in before


def test_host_gw_refuses_a_peer_whose_route_it_did_not_make_and_keeps_others_routes(lab):
    lab.segment(SEGMENT, UNDERLAY)
    hosts = {k: HOSTS[k] for k in ("h1", "h2", "h3")}
    nodes = {name: lab.add_host(name, SEGMENT, ip) for name, (ip, _) in hosts.items()}
    h1 = nodes["h1"]
    # An operator's routes: one to h3's subnet, one elsewhere in the overlay range.
    h1.ns.ip("route", "add", "10.100.7.0/24", "via", "192.0.2.1", "proto", "static")
    h1.ns.ip("route", "add", "10.100.50.0/24", "via", "192.0.2.1", "proto", "static")
    config = write_config(lab, "host-gw")
    procs = {name: start_static(nodes[name], config, hosts, "--check-interval", "0.5") for name in hosts}
    proc = procs["h1"]
    proc.wait_for("ready: 1 peer(s)", timeout=15)
    proc.wait_for(
        "peer 10.100.7.0/24 (192.0.2.13) refused: a route tunproxy did not make is in the way: "
        "10.100.7.0/24 via 192.0.2.1 dev eth1 proto static"
    )
    h1.wait_ping("10.100.18.0", timeout=10)
    eventually(lambda: "10.100.18.0/24" in " ".join(proto_routes(h1)), 5, "h2's route")
    ours = ["10.100.18.0/24 via 192.0.2.12 dev eth1 proto 116 "]
    theirs = [
        "10.100.50.0/24 via 192.0.2.1 dev eth1 proto static ",
        "10.100.7.0/24 via 192.0.2.1 dev eth1 proto static ",
    ]
    assert sorted(overlay_routes(h1)) == sorted(ours + theirs)
    assert proc.stop() == 0
    assert sorted(overlay_routes(h1)) == sorted(theirs)


# --- subnet.env at run time -----------------------------------------------------------------------


@pytest.mark.etcd
def test_a_failed_subnet_file_write_at_run_time_is_one_line_and_forwarding_goes_on(lab):
    lab.segment(SEGMENT, UNDERLAY)
    server = etcd_in_lab(lab, "udp")
    try:
        h1 = lab.add_host("h1", SEGMENT, HOSTS["h1"][0])
        h2 = lab.add_host("h2", SEGMENT, HOSTS["h2"][0])
        directory = lab.workdir / "sf" / "dir"
        env = directory / "s.env"
        p1, sub1 = start_etcd(h1, server, "--subnet-file", str(env), "--check-interval", "0.5")
        p2, sub2 = start_etcd(h2, server)
        p1.wait_for(f"peer added: {sub2}", timeout=15)
        h1.wait_ping(sub2.split("/")[0], timeout=10)
        shutil.rmtree(directory)
        directory.write_text("")  # the directory's name is now a file
        server.etcdctl("del", f"/coreos.com/network/subnets/{sub1.replace('/', '-')}")
        p1.wait_for(
            f"cannot write the subnet file {env}: {directory} is not a directory; "
            "still forwarding, retrying at each check",
            timeout=15,
        )
        h1.wait_ping(sub2.split("/")[0], timeout=10)
        h2.wait_ping(sub1.split("/")[0], timeout=10)
        assert p1.alive() and p1.output().count("cannot write the subnet file") == 1
        directory.unlink()
        directory.mkdir()
        p1.wait_for(f"wrote the subnet file {env}", timeout=10)
        assert f"FLANNEL_SUBNET={sub1.split('/')[0][:-1]}1/24" in env.read_text()
        assert p1.stop() == 0 and "Traceback" not in p1.output()
    finally:
        for proc in lab.processes:
            proc.stop(timeout=5)
        server.close()


# --- udp-only flags with another backend ------------------------------------------------------------


def test_udp_flags_with_another_backend_are_one_warning_each(lab):
    lab.segment(SEGMENT, UNDERLAY)
    h1 = lab.add_host("h1", SEGMENT, HOSTS["h1"][0])
    config = write_config(lab, "vxlan")
    flags = ["--max-routes", "1", "--port", "9999", "--tun-name", "foo", "--batch", "8", "--no-offload"]
    proc = h1.start(
        "env",
        "TUNPROXY_DROP_RING=5",
        sys.executable,
        "-m",
        "tunproxy",
        "run",
        "--iface",
        "eth1",
        "--subnet-file",
        str(lab.workdir / "h1-subnet.env"),  # its own, and so its own control socket
        "--net-config",
        str(config),
        "--subnet",
        HOSTS["h1"][1],
        *flags,
        name="tunproxy",
    )
    proc.wait_for("ready: 0 peer(s)", timeout=15)
    warned = re.findall(
        r"WARNING ignoring (\S+): only the udp backend uses it, the backend is vxlan", proc.output()
    )
    assert sorted(warned) == sorted(
        ["--max-routes", "--port", "--tun-name", "--batch", "--no-offload", "TUNPROXY_DROP_RING"]
    )
    assert proc.stop() == 0
