"""tunproxy-cni driven as a container runtime drives it, with the real CNI reference plugins.

Hosts are lab namespaces running tunproxy; pods are namespaces the test
creates; ``lab.podlab.Runtime`` calls the plugins inside the host's
namespace with the CNI_* variables and the config on stdin, as containerd does
for kube-flannel's config list (tunproxy-cni as ``flannel``, then ``portmap``).
host-local's and the plugin's state live in the lab's directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import tunproxy
from lab.hosts import SEGMENT, UNDERLAY
from lab.netns import Host, Lab, transfer
from lab.podlab import (
    CNIFailure,
    Pod,
    Runtime,
    flannel_conflist,
    leftovers,
    make_bin_dir,
    new_pod,
    reference_plugin_dir,
    wait_subnet_file,
)

from .labkit import HOSTS, start_static, start_udp, write_config

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(reference_plugin_dir() is None, reason="needs containernetworking-plugins"),
]

TWO = {name: HOSTS[name] for name in ("h1", "h2")}
MTU = {"udp": 1472, "vxlan": 1450, "host-gw": 1500}


def runtime(lab: Lab, host: Host, portmap: bool = True, bin_dir=None) -> Runtime:
    """The node's runtime, for kube-flannel's conflist with the state in the lab's directory."""
    if bin_dir is None:
        bin_dir = lab.workdir / "cni-bin"
        if not bin_dir.exists():
            make_bin_dir(bin_dir)
    name = host.name
    conflist = flannel_conflist(
        lab.workdir / f"{name}-subnet.env",
        lab.workdir / f"{name}-cni",
        lab.workdir / f"{name}-ipam",
        portmap=portmap,
    )
    return Runtime(host, bin_dir, conflist)


def state(lab: Lab, host: Host, pods: list[Pod]) -> list[str]:
    return leftovers(
        host,
        lab.workdir / f"{host.name}-ipam",
        lab.workdir / f"{host.name}-cni",
        [p.container_id for p in pods],
    )


def one_host(lab: Lab) -> Host:
    """h1 alone, tunproxy udp with no peers, its subnet.env written."""
    lab.segment(SEGMENT, UNDERLAY)
    host = lab.add_host("h1", SEGMENT, HOSTS["h1"][0])
    start_udp(host, peers=())
    wait_subnet_file(lab.workdir / "h1-subnet.env")
    return host


def ip_json(pod_or_host, *argv):
    return json.loads(pod_or_host.ns.run("ip", "-j", *argv).stdout or "[]")


_PEER_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(1)
s.settimeout(20)
print("listening", flush=True)
c, peer = s.accept()
print("peer", peer[0], flush=True)
c.sendall(b"hello from the pod")
c.close()
"""

_CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print(c.recv(100).decode())
"""


def serve(pod: Pod, port: int):
    server = pod.as_host().start(sys.executable, "-c", _PEER_SERVER, str(port), name="server")
    server.wait_for("listening")
    return server


def connect(host: Host, address: str, port: int, check: bool = True):
    return host.ns.run(sys.executable, "-c", _CLIENT, address, str(port), check=check, timeout=15)


def test_add_gives_an_address_in_the_hosts_subnet_with_its_mtu_and_routes(lab):
    host = one_host(lab)
    rt = runtime(lab, host)
    pod = new_pod(lab, host, "p1")
    result = rt.add(pod)

    ip = result["ips"][0]
    assert ip["address"] == "10.100.5.2/24" and ip["gateway"] == "10.100.5.1"  # host-local's first free
    eth0 = next(i for i in result["interfaces"] if i["name"] == "eth0")
    assert eth0["sandbox"] == pod.netns_path
    (link,) = ip_json(pod, "link", "show", "eth0")
    assert link["mtu"] == 1472  # FLANNEL_MTU of the udp backend
    assert {r["dst"]: r.get("gateway") for r in ip_json(pod, "-4", "route")} == {
        "default": "10.100.5.1",
        "10.100.0.0/16": "10.100.5.1",  # flannel's route to the whole network
        "10.100.5.0/24": None,
    }
    (lo,) = ip_json(pod, "link", "show", "lo")
    assert "UP" in lo["flags"]  # the loopback plugin ran

    bridge = ip_json(host, "-4", "addr", "show", "cni0")[0]
    assert [a["local"] + f"/{a['prefixlen']}" for a in bridge["addr_info"]] == ["10.100.5.1/24"]
    (veth,) = ip_json(host, "-d", "link", "show", "master", "cni0")
    assert veth["linkinfo"]["info_slave_data"]["hairpin"] is True  # delegate hairpinMode from the conflist
    # FLANNEL_IPMASQ=false: tunproxy does not masquerade, so flannel has the bridge do it.
    nat = host.ns.run("iptables-save", "-t", "nat").stdout
    assert "-s 10.100.5.2/32" in nat and "MASQUERADE" in nat
    stored = json.loads((lab.workdir / "h1-cni" / pod.container_id).read_text())
    assert (stored["type"], stored["mtu"], stored["ipMasq"], stored["bridge"]) == (
        "bridge",
        1472,
        True,
        "cni0",
    )
    assert (lab.workdir / "h1-ipam" / "cbr0" / "10.100.5.2").exists()

    host.wait_ping("10.100.5.2", timeout=5)
    pod.as_host().wait_ping("10.100.5.0", timeout=5)  # the host's overlay address, on tunproxy0
    second = new_pod(lab, host, "p2")
    assert rt.add(second)["ips"][0]["address"] == "10.100.5.3/24"
    for p in (pod, second):
        rt.delete(p)
    assert state(lab, host, [pod, second]) == []


@pytest.mark.parametrize("backend", ["udp", "vxlan", "host-gw"])
def test_pods_reach_each_other_across_hosts(lab, backend):
    lab.segment(SEGMENT, UNDERLAY)
    nodes = {name: lab.add_host(name, SEGMENT, ip) for name, (ip, _) in TWO.items()}
    config = write_config(lab, backend)
    for name, node in nodes.items():
        # --ip-masq: the bridge masquerades nothing, so a pod sees the other pod's own address.
        start_static(node, config, TWO, "--ip-masq")
        wait_subnet_file(lab.workdir / f"{name}-subnet.env")
    runtimes = {name: runtime(lab, node) for name, node in nodes.items()}
    a, b = new_pod(lab, nodes["h1"], "a"), new_pod(lab, nodes["h2"], "b")
    c = new_pod(lab, nodes["h1"], "c")
    for pod in (a, b, c):
        runtimes[pod.node.name].add(pod)
        assert pod.address.startswith("10.100.5." if pod.node.name == "h1" else "10.100.18.")
        assert ip_json(pod, "link", "show", "eth0")[0]["mtu"] == MTU[backend]
    assert "MASQUERADE" not in nodes["h1"].ns.run("iptables-save", "-t", "nat").stdout

    for src, dst in ((a, b), (b, a), (c, b), (a, c)):
        src.as_host().wait_ping(dst.address, timeout=10)
    server = serve(b, 7000)
    assert connect(a.as_host(), b.address, 7000).stdout.strip() == "hello from the pod"
    server.popen.wait(10)
    assert f"peer {a.address}" in server.output()  # no NAT between pods: the overlay carries pod addresses
    sent, received = transfer(b.as_host(), a.as_host(), a.address, 4 << 20, port=7001)
    assert received == sent

    for pod in (a, b, c):
        runtimes[pod.node.name].delete(pod)
    for node in nodes.values():
        assert state(lab, node, [a, b, c]) == []
    assert a.as_host().ping(b.address).returncode != 0


def test_check_passes_then_fails_once_the_pod_interface_is_gone(lab):
    host = one_host(lab)
    rt = runtime(lab, host)
    pod = new_pod(lab, host, "p1")
    rt.add(pod)
    # bridge's CHECK requires prevResult: passing means tunproxy-cni handed the runtime's on.
    rt.check(pod)
    # tunproxy lost its lease and took another subnet: the pod's address is no longer routed here.
    subnet_file = lab.workdir / "h1-subnet.env"
    written = subnet_file.read_text()
    subnet_file.write_text(written.replace("10.100.5.1/24", "10.100.9.1/24"))
    with pytest.raises(CNIFailure) as failure:
        rt.check(pod)
    assert failure.value.msg == (
        "the pod's addresses are from 10.100.5.0/24, but this host's subnet is now 10.100.9.0/24 "
        "(subnet.env changed since ADD): recreate the pod"
    )
    subnet_file.write_text(written)
    rt.check(pod)
    pod.ns.ip("link", "del", "eth0")
    with pytest.raises(CNIFailure) as failure:
        rt.check(pod)
    assert failure.value.plugin == "flannel"
    assert failure.value.msg.startswith("failed to delegate CHECK to bridge: ")
    assert "eth0" in failure.value.msg
    assert failure.value.stderr.strip().endswith(f"tunproxy-cni: error: {failure.value.msg}")
    rt.delete(pod)
    # The veth, the reservation and our stored config go. bridge's ipMasq rules stay: its DEL
    # learns the pod's addresses from the pod's interface, which this test deleted (bridge 1.1).
    left = state(lab, host, [pod])
    assert left and all(item.startswith("iptables rule ") for item in left)


def test_del_is_idempotent_and_needs_no_subnet_env(lab):
    host = one_host(lab)
    rt = runtime(lab, host)
    pods = [new_pod(lab, host, f"p{i}") for i in range(2)]
    for pod in pods:
        rt.add(pod)
    assert len(state(lab, host, pods)) >= 6  # a veth, a reservation, a stored config, NAT rules each
    for proc in lab.processes:
        proc.stop()
    (lab.workdir / "h1-subnet.env").unlink()  # tunproxy gone, its subnet.env with it

    for pod in pods:
        rt.delete(pod)
    assert state(lab, host, pods) == []
    assert ip_json(host, "link", "show", "master", "cni0") == []
    for pod in pods:
        rt.delete(pod)  # again: nothing to undo, still success
    assert state(lab, host, pods) == []
    never = new_pod(lab, host, "never")
    rt.delete(never)  # DEL of a container that was never added


def test_chain_with_portmap_gets_our_result_as_prev_result(lab):
    lab.segment(SEGMENT, UNDERLAY)
    h1 = lab.add_host("h1", SEGMENT, HOSTS["h1"][0])
    h2 = lab.add_host("h2", SEGMENT, HOSTS["h2"][0])
    start_udp(h1, peers=())
    wait_subnet_file(lab.workdir / "h1-subnet.env")
    rt = runtime(lab, h1)
    pod = new_pod(lab, h1, "web")
    mappings = {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]}
    rt.add(pod, mappings)

    flannel_result, portmap_result = pod.results
    assert portmap_result == flannel_result  # portmap parsed our result as prevResult and passed it on
    assert flannel_result["cniVersion"] == "1.0.0" and flannel_result["ips"][0]["address"] == "10.100.5.2/24"
    server = serve(pod, 80)
    assert connect(h2, "192.0.2.11", 8080).stdout.strip() == "hello from the pod"
    server.popen.wait(10)
    # No CHECK here: portmap 1.1's CHECK looks for an IPv6 DNAT chain it never made, whatever
    # came before it (the CHECK test above runs the same list without mappings).

    rt.delete(pod)
    assert state(lab, h1, [pod]) == []
    refused = connect(h2, "192.0.2.11", 8080, check=False)
    assert refused.returncode != 0


def test_errors_reach_the_runtime_as_cni_errors(lab):
    lab.segment(SEGMENT, UNDERLAY)
    host = lab.add_host("h1", SEGMENT, HOSTS["h1"][0])
    rt = runtime(lab, host)
    pod = new_pod(lab, host, "early")
    with pytest.raises(CNIFailure) as failure:
        rt.add(pod)  # before tunproxy has a lease
    assert failure.value.code == 11
    assert (
        failure.value.msg == f"{lab.workdir}/h1-subnet.env does not exist: is tunproxy running on this host?"
    )
    assert pod.ns.ip("link", "show", "eth0", check=False).returncode != 0  # nothing was created
    rt.delete(pod)  # the runtime's DEL after a failed ADD

    start_udp(host, peers=())
    wait_subnet_file(lab.workdir / "h1-subnet.env")
    assert rt.add(pod)["ips"][0]["address"] == "10.100.5.2/24"  # try again later: now it works
    rt.delete(pod)

    no_bridge = make_bin_dir(
        lab.workdir / "bin-without-bridge", plugins=("host-local", "loopback", "portmap")
    )
    broken = runtime(lab, host, bin_dir=no_bridge)
    other = new_pod(lab, host, "nobridge")
    with pytest.raises(CNIFailure) as failure:
        broken.add(other)
    assert (failure.value.code, failure.value.msg) == (
        999,
        f'failed to find plugin "bridge" in path [{no_bridge}]',
    )
    assert other.ns.ip("link", "show", "eth0", check=False).returncode != 0
    broken.delete(other)
    assert state(lab, host, [pod, other]) == []


def test_without_ip_masq_the_bridge_masquerades_what_leaves_the_hosts_subnet(lab):
    """flannel's rule: a daemon that does not masquerade (FLANNEL_IPMASQ=false) gets ipMasq on the bridge."""
    lab.segment(SEGMENT, UNDERLAY)
    nodes = {name: lab.add_host(name, SEGMENT, ip) for name, (ip, _) in TWO.items()}
    for name, node in nodes.items():
        start_udp(node, peers=tuple(p for p in TWO if p != name))
        wait_subnet_file(lab.workdir / f"{name}-subnet.env")
    a, b = new_pod(lab, nodes["h1"], "a"), new_pod(lab, nodes["h2"], "b")
    runtime(lab, nodes["h1"]).add(a)
    runtime(lab, nodes["h2"]).add(b)
    a.as_host().wait_ping(b.address, timeout=10)
    server = serve(b, 7000)
    assert connect(a.as_host(), b.address, 7000).stdout.strip() == "hello from the pod"
    server.popen.wait(10)
    assert "peer 10.100.5.0\n" in server.output()  # h1's address on tunproxy0, not the pod's 10.100.5.2


def test_demo_pods_runs_clean():
    """``make demo-pods``: every pod reaches every other, the TCP data arrives, DEL leaves nothing."""
    proc = subprocess.run(
        [sys.executable, "-m", "lab.demo", "--pods"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(Path(tunproxy.__file__).resolve().parent.parent)),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all pairs ok" in proc.stdout and "8 MiB arrived intact" in proc.stdout
    assert proc.stdout.count("after DEL: nothing left") == 3
    assert not [
        n
        for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
        if n.startswith("tppods")
    ]
