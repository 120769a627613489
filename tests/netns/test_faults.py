"""Faults found under etcd stalls, scale and labs (issue 8), each smallest input kept as a test."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.etcd import EtcdServer, NamespacedEtcdCluster, bulk_leases
from lab.hosts import ETCD_MEMBERS, SEGMENT, UNDERLAY
from lab.netns import Host, Lab, Process

from .labkit import ETCD_ADDRESS, HOSTS, NETWORK, eventually, overlay, start_etcd

pytestmark = [pytest.mark.root, pytest.mark.etcd]


def _stall(pids: list[int], seconds: float) -> None:
    """SIGSTOP processes for ``seconds``; SIGCONT them even if the sleep is interrupted."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def _stop_all(lab: Lab) -> None:
    for proc in lab.processes:  # tunproxy first, so it does not spend the teardown retrying etcd
        proc.stop(timeout=5)


@pytest.fixture
def etcd_lab(lab: Lab) -> Iterator[tuple[Lab, dict[str, Host]]]:
    lab.segment(SEGMENT, UNDERLAY)
    lab.switch_address(SEGMENT, ETCD_ADDRESS)
    nodes = {name: lab.add_host(name, SEGMENT, ip) for name, (ip, _) in HOSTS.items()}
    yield lab, nodes
    _stop_all(lab)


def _server(lab: Lab, **config: object) -> EtcdServer:
    server = EtcdServer(address=ETCD_ADDRESS, ns=lab.switch, workdir=lab.workdir).start()
    doc = {"Network": NETWORK, "SubnetLen": 24, "Backend": {"Type": "udp"}, **config}
    server.etcdctl("put", "/coreos.com/network/config", json.dumps(doc))
    return server


def _third_host_is_routed_to(nodes: dict[str, Host], procs: dict[str, Process], start: Process) -> None:
    found = re.search(r"our subnet is (\S+)", start.output())
    assert found
    subnet = found.group(1)
    for name in ("h1", "h2"):
        procs[name].wait_for(f"peer added: {subnet}", timeout=30)
        nodes[name].wait_ping(overlay(subnet), timeout=10)
    for proc in (*procs.values(), start):
        assert proc.alive() and "Traceback" not in proc.output(), proc.output()


# --- 1. the watch must outlive a stalled etcd and a lost quorum ----------------------------


def test_a_host_joining_after_an_etcd_stall_is_routed_to(etcd_lab) -> None:
    """A 20 s SIGSTOP of etcd used to end the watch for good (a call cancelled under it was
    taken for the task's own cancellation); the daemons kept renewing and never added h3."""
    lab, nodes = etcd_lab
    server = _server(lab)
    try:
        procs = {name: start_etcd(nodes[name], server)[0] for name in ("h1", "h2")}
        assert server.popen is not None
        _stall([server.popen.pid], 20)
        third, _ = start_etcd(nodes["h3"], server)
        _third_host_is_routed_to(nodes, procs, third)
    finally:
        _stop_all(lab)
        server.close()


def test_a_host_joining_after_a_lost_quorum_is_routed_to(etcd_lab) -> None:
    """Two of three members stopped for 20 s: the third has no quorum, calls time out."""
    lab, nodes = etcd_lab
    cluster = NamespacedEtcdCluster(lab, SEGMENT, list(ETCD_MEMBERS)).start()
    try:
        doc = {"Network": NETWORK, "SubnetLen": 24, "Backend": {"Type": "udp"}}
        cluster.etcdctl("put", "/coreos.com/network/config", json.dumps(doc))
        procs = {}
        for name in ("h1", "h2"):
            procs[name] = nodes[name].tunproxy("--etcd-endpoints", cluster.endpoints)
            procs[name].wait_for("our subnet is", timeout=20)
        _stall([cluster.pid("m1"), cluster.pid("m2")], 20)
        third = nodes["h3"].tunproxy("--etcd-endpoints", cluster.endpoints)
        third.wait_for("our subnet is", timeout=30)
        _third_host_is_routed_to(nodes, procs, third)
    finally:
        _stop_all(lab)
        cluster.close()


# --- 2 and 3. thousands of peers -----------------------------------------------------------


def _routed_now(proc: Process) -> int:
    counts = re.findall(r"\((\d+) routed now\)", proc.output())
    return int(counts[-1]) if counts else 0


def test_revoking_2000_peers_keeps_forwarding(etcd_lab) -> None:
    """2,000 removals used to take 7.2 s of event loop (a Python rebuild of the table per
    removal), stalling pings through the host for up to 7.1 s."""
    lab, nodes = etcd_lab
    server = _server(lab, SubnetLen=28)
    try:
        bulk = bulk_leases(server, 2000, 28)
        procs, subnets = {}, {}
        for name in ("h1", "h2"):
            procs[name], subnets[name] = start_etcd(nodes[name], server)
        procs["h1"].wait_for("2000 added, 0 removed in one burst (2000 routed now)", timeout=30)
        procs["h1"].wait_for(f"peer added: {subnets['h2']}", timeout=10)
        nodes["h1"].wait_ping(overlay(subnets["h2"]))
        pinger = nodes["h1"].start(
            "ping", "-n", "-q", "-i", "0.01", "-c", "500", "-W", "1", overlay(subnets["h2"]), name="ping"
        )
        time.sleep(1)
        server.etcdctl("lease", "revoke", f"{bulk:x}")
        procs["h1"].wait_for("removed in one burst (1 routed now)", timeout=20)  # h2 is left
        assert pinger.alive(), "the removals were not applied while the pings ran"
        assert pinger.popen.wait(30) == 0, pinger.output()
        loss = re.search(r"(\d+)% packet loss", pinger.output())
        rtt = re.search(r"= [\d.]+/[\d.]+/([\d.]+)/", pinger.output())
        assert loss and rtt, pinger.output()
        assert int(loss.group(1)) == 0 and float(rtt.group(1)) < 200, pinger.output()
        assert _routed_now(procs["h1"]) == 1
    finally:
        _stop_all(lab)
        server.close()


def test_5000_leases_are_all_routed(etcd_lab) -> None:
    """The C table was capped at 4,096 routes; flannel clusters reach 5,000 nodes."""
    lab, nodes = etcd_lab
    server = _server(lab, SubnetLen=29)
    try:
        bulk_leases(server, 5000, 29)
        procs, subnets = {}, {}
        for name in ("h1", "h2"):
            procs[name], subnets[name] = start_etcd(nodes[name], server)
        procs["h1"].wait_for("5000 added, 0 removed in one burst (5000 routed now)", timeout=60)
        procs["h1"].wait_for(f"peer added: {subnets['h2']}", timeout=10)
        assert "route table full" not in procs["h1"].output()
        nodes["h1"].wait_ping(overlay(subnets["h2"]))
        # Bulk subnets 1, 2500 and 5000 are routed (to absent hosts): no "net unreachable".
        for index in (1, 2500, 5000):
            target = f"10.100.{index * 8 // 256}.{index * 8 % 256 + 1}"
            assert "Unreachable" not in nodes["h1"].ping(target, timeout=1).stdout, target
        assert "Unreachable" in nodes["h1"].ping("10.100.250.1", timeout=1).stdout  # never leased
    finally:
        _stop_all(lab)
        server.close()


def test_a_lease_refused_by_a_full_table_is_added_when_room_frees(etcd_lab) -> None:
    lab, nodes = etcd_lab
    server = _server(lab)
    try:
        h1, _ = start_etcd(nodes["h1"], server, "--max-routes", "1")
        procs, subnets = {}, {}
        for name in ("h2", "h3"):
            procs[name], subnets[name] = start_etcd(nodes[name], server)
        h1.wait_for("route table full (1 routes): not routing 1 peer(s)", timeout=10)
        routed = "h2" if f"peer added: {subnets['h2']}" in h1.output() else "h3"
        refused = "h3" if routed == "h2" else "h2"
        assert f"peer added: {subnets[refused]}" not in h1.output()
        assert "Unreachable" in nodes["h1"].ping(overlay(subnets[refused]), timeout=1).stdout
        procs[routed].popen.kill()
        procs[routed].popen.wait(5)
        server.etcdctl("del", f"/coreos.com/network/subnets/{subnets[routed].replace('/', '-')}")
        h1.wait_for(f"peer added: {subnets[refused]}", timeout=15)
        nodes["h1"].wait_ping(overlay(subnets[refused]))
    finally:
        _stop_all(lab)
        server.close()


# --- 5. daemons sharing one filesystem ----------------------------------------------------

DEFAULT_SUBNET_FILE = Path("/run/tunproxy/subnet.env")


def test_two_daemons_started_together_with_the_default_subnet_file(lab: Lab) -> None:
    """Both used to write /run/tunproxy/subnet.env through one temporary name; one died in 1-2
    of 10 tries with 'No such file or directory', naming no file."""
    ours = (DEFAULT_SUBNET_FILE, DEFAULT_SUBNET_FILE.with_name("subnet.env.lock"))
    left_behind = [path for path in ours if not path.exists()]
    lab.segment(SEGMENT, UNDERLAY)
    hosts = {name: lab.add_host(name, SEGMENT, HOSTS[name][0]) for name in ("h1", "h2")}

    def argv(name: str, other: str) -> list[str]:
        return [
            sys.executable, "-m", "tunproxy", "run", "--network", NETWORK, "--subnet", HOSTS[name][1],
            "--iface", "eth1", "--peer", f"{HOSTS[other][0]}={HOSTS[other][1]}", "--stats-interval", "0",
        ]  # fmt: skip

    try:
        for _ in range(20):
            procs = {
                "h2": hosts["h2"].start(*argv("h2", "h1"), name="tunproxy"),
                "h1": hosts["h1"].start(*argv("h1", "h2"), name="tunproxy"),
            }
            eventually(
                lambda procs=procs: (
                    sum(not p.alive() for p in procs.values()) == 1
                    and any("our subnet is" in p.output() for p in procs.values())
                ),
                20,
                "one daemon runs and the other is refused",
            )
            [loser] = [p for p in procs.values() if not p.alive()]
            [winner] = [p for p in procs.values() if p.alive()]
            lines = loser.output().strip().splitlines()
            assert loser.popen.returncode == 2, loser.output()
            assert lines == [
                f"tunproxy: error: subnet file {DEFAULT_SUBNET_FILE} is in use by another tunproxy "
                f"(pid {winner.pid}); give each daemon its own --subnet-file"
            ], loser.output()
            assert winner.stop() == 0, winner.output()
            assert "Traceback" not in winner.output()
    finally:
        for proc in lab.processes:
            proc.stop(timeout=5)
        for path in left_behind:
            path.unlink(missing_ok=True)


def test_an_os_error_names_the_path(tmp_path: Path) -> None:
    """Every OSError that reaches the user names the file or device."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    out = subprocess.run(
        [sys.executable, "-m", "tunproxy", "run", "--network", NETWORK, "--subnet", "10.100.5.0/24",
         "--subnet-file", str(blocker / "subnet.env")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        f"tunproxy: error: cannot create the directory {blocker}: File exists"
    ], out.stderr
