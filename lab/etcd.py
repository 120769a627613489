"""A real etcd for the lab: one server (on loopback or in a namespace), a cluster of members in
namespaces, and thousands of leases written as hosts would.

Every server runs from a throwaway data dir and is stopped by PID (``close()``,
or ``with``); the members of a cluster live in namespaces of a ``Lab`` and go
with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Network
from pathlib import Path

from .hosts import NETWORK, UNDERLAY
from .netns import Lab, Netns, free_port, sh, stop_process


def etcd_argv(name: str, datadir: Path, client: str, peer: str, cluster: str) -> list[str]:
    """etcd's command line for member ``name`` of the new cluster ``cluster`` (name=peer-url,...)."""
    return [
        "etcd", "--name", name, "--data-dir", str(datadir),
        "--listen-client-urls", client, "--advertise-client-urls", client,
        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        "--initial-cluster", cluster, "--initial-cluster-state", "new",
        "--log-level", "warn",
    ]  # fmt: skip


def spawn_logged(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session, appending its output to ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )


def etcdctl(
    endpoints: str, ns: Netns | None, *args: str, check: bool = True, timeout: float = 15
) -> subprocess.CompletedProcess[str]:
    """``etcdctl`` (API v3) against ``endpoints``, run in ``ns`` if given; bounded in time."""
    argv = ["etcdctl", f"--endpoints={endpoints}", "--dial-timeout=2s", "--command-timeout=5s", *args]
    if ns:
        argv = ns.cmd(*argv)
    return subprocess.run(
        argv,
        check=check,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, ETCDCTL_API="3"),
    )


class EtcdServer:
    """A real etcd (Debian's etcd-server) with a throwaway data dir, stopped by PID.

    On loopback by default; pass a lab and a namespace to run it inside the lab,
    listening on ``address`` there.
    """

    def __init__(
        self,
        address: str = "127.0.0.1",
        port: int | None = None,
        ns: Netns | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.address = address
        self.port = port or free_port()
        self.peer_port = free_port()
        self.ns = ns
        self._tmp = tempfile.TemporaryDirectory(prefix="tunproxy-etcd-", dir=workdir)
        self.datadir = Path(self._tmp.name)
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.address}:{self.port}"

    def start(self, timeout: float = 20) -> EtcdServer:
        client = f"http://{self.address}:{self.port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = etcd_argv("tp", self.datadir / "data", client, peer, f"tp={peer}")
        self.popen = spawn_logged(self.ns.cmd(*argv) if self.ns else argv, self.datadir / "etcd.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.etcdctl("endpoint", "health", check=False).returncode == 0:
                return self
            if self.popen.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"etcd did not start: {(self.datadir / 'etcd.log').read_text()[-2000:]}")

    def etcdctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return etcdctl(self.endpoint, self.ns, *args, check=check)

    def stop(self) -> None:
        """Stop the server but keep its data, so ``start()`` brings the same cluster back."""
        if self.popen:
            stop_process(self.popen)

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class NamespacedEtcdCluster:
    """Three (or more) real etcd members, each in its own namespace on a lab segment, as deployed.

    Member ``mI`` lives in namespace ``etcdI`` at ``addresses[I]`` (client port
    2379, peer port 2380, etcd's defaults). Faults a user meets: ``kill`` a
    member (SIGKILL, say the leader), ``partition`` it (its link down) and
    ``heal`` it, ``stop``/``start`` any set of members; data dirs survive, so
    a restarted member rejoins the same cluster. ``etcdctl`` runs in the
    switch namespace, which needs an address on the segment (``Lab.switch_address``).
    """

    CLIENT_PORT = 2379
    PEER_PORT = 2380

    def __init__(self, lab: Lab, segment: str, addresses: list[str]) -> None:
        self.lab = lab
        self.names = [f"m{i}" for i in range(len(addresses))]
        self.addresses = dict(zip(self.names, addresses, strict=True))
        self.namespaces: dict[str, Netns] = {}
        for i, name in enumerate(self.names):
            ns = lab._netns(f"etcd{i}")
            lab.attach(ns, segment, addresses[i], "eth1")
            self.namespaces[name] = ns
        self._tmp = tempfile.TemporaryDirectory(prefix="tunproxy-etcd-ns-", dir=lab.workdir)
        self.datadir = Path(self._tmp.name)
        self.popens: dict[str, subprocess.Popen[bytes]] = {}

    def endpoint(self, name: str) -> str:
        return f"http://{self.addresses[name]}:{self.CLIENT_PORT}"

    @property
    def endpoints(self) -> str:
        """Every member's client URL, comma-separated, as --etcd-endpoints takes them."""
        return ",".join(self.endpoint(name) for name in self.names)

    def start(self, *names: str, timeout: float = 30) -> NamespacedEtcdCluster:
        """Start ``names`` (default: every member not running) and wait for the cluster to be healthy."""
        cluster = ",".join(f"{n}=http://{a}:{self.PEER_PORT}" for n, a in self.addresses.items())
        for name in names or self.names:
            popen = self.popens.get(name)
            if popen is not None and popen.poll() is None:
                continue
            peer = f"http://{self.addresses[name]}:{self.PEER_PORT}"
            argv = etcd_argv(name, self.datadir / name, self.endpoint(name), peer, cluster)
            self.popens[name] = spawn_logged(self.namespaces[name].cmd(*argv), self.datadir / f"{name}.log")
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.etcdctl("endpoint", "health", check=False).returncode == 0:
                return
            time.sleep(0.2)
        logs = {n: (self.datadir / f"{n}.log").read_text(errors="replace")[-800:] for n in self.names}
        raise RuntimeError(f"the etcd cluster is not healthy after {timeout:.0f}s: {logs}")

    def etcdctl(
        self, *args: str, check: bool = True, endpoints: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return etcdctl(endpoints or self.endpoints, self.lab.switch, *args, check=check, timeout=30)

    def pid(self, name: str) -> int:
        return self.popens[name].pid

    def leader(self) -> str:
        """The member that is leader now, from ``etcdctl endpoint status -w json``; RuntimeError if none."""
        import json

        out = self.etcdctl("endpoint", "status", "-w", "json", check=False)
        for status in json.loads(out.stdout or "[]"):
            header = status["Status"]["header"]
            if header["member_id"] == status["Status"]["leader"]:
                for name in self.names:
                    if status["Endpoint"] == self.endpoint(name):
                        return name
        raise RuntimeError(f"no etcd leader: {out.stdout.strip()} {out.stderr.strip()}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        popen = self.popens[name]
        with contextlib.suppress(ProcessLookupError):
            popen.send_signal(sig)
        popen.wait(10)

    def stop(self, *names: str) -> None:
        for name in names or self.names:
            if name in self.popens:
                stop_process(self.popens[name])

    def partition(self, name: str) -> None:
        """Cut ``name`` off the segment: its link goes down, so packets to it are lost, not refused."""
        self.namespaces[name].ip("link", "set", "eth1", "down")

    def heal(self, name: str) -> None:
        self.namespaces[name].ip("link", "set", "eth1", "up")

    def close(self) -> None:
        for popen in self.popens.values():
            stop_process(popen, timeout=5)
        self._tmp.cleanup()


_BULK = """
import asyncio, json, sys
from ipaddress import IPv4Address, IPv4Network
import aetcd

async def main(host, port, count, length, first, network, first_ip):
    async with aetcd.Client(host, int(port), timeout=10) as client:
        grant = await client.lease(3600)
        t = client.transactions
        subnets = list(IPv4Network(network).subnets(new_prefix=int(length)))[int(first):]
        ops = []
        for i, net in enumerate(subnets[: int(count)]):
            key = f"/coreos.com/network/subnets/{net.network_address}-{net.prefixlen}".encode()
            public_ip = str(IPv4Address(first_ip) + i % 50)
            value = json.dumps({"PublicIP": public_ip, "BackendType": "udp"}).encode()
            ops.append(t.put(key, value, lease=grant.id))
        for start in range(0, len(ops), 100):
            await client.transaction(compare=[], success=ops[start : start + 100], failure=[])
        print(grant.id, flush=True)

asyncio.run(main(*sys.argv[1:]))
"""


def bulk_leases(server: EtcdServer, count: int, subnet_len: int, first: int = 1, ip_base: int = 200) -> int:
    """Write ``count`` udp leases of /``subnet_len`` subnets of NETWORK (from the ``first``-th)
    into ``server`` as thousands of hosts would, all on one etcd lease; returns that lease's ID.

    The PublicIPs cycle through 192.0.2.``ip_base`` to ``ip_base + 49`` (addresses nobody holds).
    Runs where the server is reachable (its namespace); transactions of 100 puts.
    """
    argv = [sys.executable, "-c", _BULK, server.address, str(server.port), str(count), str(subnet_len)]
    argv += [str(first), NETWORK, str(IPv4Network(UNDERLAY)[ip_base])]
    if server.ns:
        out = server.ns.run(*argv, timeout=300)
    else:
        out = sh(*argv, timeout=300)
    return int(out.stdout.split()[-1])
