"""A lab of network namespaces: hosts on bridged underlay segments, for the demo, tests and bench.

Every name starts with a per-lab prefix, every process is tracked by PID, and
``close()`` (also on exceptions, via ``with Lab() as lab``) kills what it
started and deletes every namespace, so a failed run leaves nothing behind.
The switch namespace holds one bridge per segment; an extra address on a
bridge (e.g. for etcd) lives there too, so nothing touches the host's own
network.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

_counter = itertools.count()


def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout)


@dataclass
class Netns:
    name: str

    def cmd(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        try:
            return sh(*self.cmd(*argv), check=check, timeout=timeout)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(
                f"[{self.name}] {shlex.join(argv)} exited {e.returncode}: {(e.stderr or e.stdout).strip()}"
            ) from None

    def ip(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("ip", *argv, check=check)


def stop_process(popen: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
    """Signal a child and reap it; SIGKILL if it has not exited within ``timeout``."""
    if popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            popen.send_signal(sig)
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(5)
    return popen.returncode


@dataclass
class Process:
    """A process started in a namespace, its output going to a file we can read back."""

    popen: subprocess.Popen[bytes]
    log_path: Path
    argv: list[str]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        return stop_process(self.popen, sig, timeout)

    def wait_for(self, text: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if not self.alive():
                break
            time.sleep(0.05)
        raise TimeoutError(f"{shlex.join(self.argv)} did not log {text!r}; output:\n{self.output()[-3000:]}")


@dataclass
class Host:
    lab: Lab
    name: str
    ns: Netns
    address: ipaddress.IPv4Address
    iface: str = "eth1"
    processes: list[Process] = field(default_factory=list)

    def start(self, *argv: str, name: str = "proc") -> Process:
        return self.lab.start(self.ns, argv, f"{self.name}-{name}")

    def tunproxy(self, *args: str) -> Process:
        """Start ``tunproxy run`` in this host; logs and subnet.env go to the lab's directory."""
        argv = [
            sys.executable,
            "-m",
            "tunproxy",
            "run",
            "--iface",
            self.iface,
            "--subnet-file",
            str(self.lab.workdir / f"{self.name}-subnet.env"),
            *args,
        ]
        return self.start(*argv, name="tunproxy")

    def ping(
        self,
        target: str,
        count: int = 1,
        timeout: float = 2,
        check: bool = False,
        extra: tuple[str, ...] = (),
    ) -> subprocess.CompletedProcess[str]:
        return self.ns.run(
            "ping",
            "-n",
            "-c",
            str(count),
            "-W",
            str(timeout),
            "-i",
            "0.2",
            *extra,
            target,
            check=check,
            timeout=count * (timeout + 1) + 5,
        )

    def wait_ping(self, target: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ping(target, timeout=1).returncode == 0:
                return
        raise TimeoutError(f"{self.name} cannot ping {target} after {timeout:.0f}s")


class Lab:
    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or f"tpl{os.getpid() % 100000}x{next(_counter)}"
        self.namespaces: list[Netns] = []
        self.processes: list[Process] = []
        self.hosts: dict[str, Host] = {}
        self.segments: dict[str, ipaddress.IPv4Network] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix=f"{self.prefix}-")
        self.workdir = Path(self._tmp.name)
        self.switch = self._netns("sw")
        self._veths = itertools.count()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _netns(self, name: str) -> Netns:
        ns = Netns(f"{self.prefix}-{name}")
        sh("ip", "netns", "add", ns.name)
        self.namespaces.append(ns)
        ns.ip("link", "set", "lo", "up")
        return ns

    def segment(self, name: str, cidr: str, mtu: int = 1500) -> ipaddress.IPv4Network:
        """An L2 segment: a bridge in the switch namespace."""
        net = ipaddress.IPv4Network(cidr)
        self.switch.ip("link", "add", name, "type", "bridge")
        self.switch.ip("link", "set", name, "mtu", str(mtu), "up")
        self.segments[name] = net
        return net

    def attach(self, ns: Netns, segment: str, address: str, iface: str, mtu: int = 1500) -> None:
        outer = f"v{next(self._veths)}{segment}"[:15]
        self.switch.ip(
            "link",
            "add",
            outer,
            "mtu",
            str(mtu),
            "type",
            "veth",
            "peer",
            "name",
            iface,
            "mtu",
            str(mtu),
            "netns",
            ns.name,
        )
        self.switch.ip("link", "set", outer, "master", segment, "up")
        ns.ip("addr", "add", f"{address}/{self.segments[segment].prefixlen}", "dev", iface)
        ns.ip("link", "set", iface, "up")

    def add_host(
        self, name: str, segment: str, address: str, gateway: str | None = None, mtu: int = 1500
    ) -> Host:
        ns = self._netns(name)
        self.attach(ns, segment, address, "eth1", mtu)
        if gateway:
            ns.ip("route", "add", "default", "via", gateway)
        host = Host(self, name, ns, ipaddress.IPv4Address(address))
        self.hosts[name] = host
        return host

    def add_veth_pair(
        self, a: tuple[str, str], b: tuple[str, str], prefixlen: int = 24, mtu: int = 1500
    ) -> tuple[Host, Host]:
        """Two hosts joined by ONE veth, no bridge: ``a`` and ``b`` are (name, address).

        The bench's underlay: a bridge in the path costs throughput, and the
        reference figures were measured over a bare veth. Both ends are eth1.
        """
        hosts = []
        for name, address in (a, b):
            host = Host(self, name, self._netns(name), ipaddress.IPv4Address(address))
            self.hosts[name] = host
            hosts.append(host)
        first, second = hosts
        first.ns.ip(
            "link", "add", "eth1", "mtu", str(mtu), "type", "veth",
            "peer", "name", "eth1", "mtu", str(mtu), "netns", second.ns.name,
        )  # fmt: skip
        for host in hosts:
            host.ns.ip("addr", "add", f"{host.address}/{prefixlen}", "dev", "eth1")
            host.ns.ip("link", "set", "eth1", "up")
        return first, second

    def add_router(self, name: str, legs: dict[str, str]) -> Netns:
        """A namespace forwarding between segments: legs maps segment -> its address there."""
        ns = self._netns(name)
        for i, (segment, address) in enumerate(legs.items()):
            self.attach(ns, segment, address, f"eth{i + 1}")
        ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        return ns

    def switch_address(self, segment: str, address: str) -> None:
        """Give the switch namespace an address on a segment (e.g. where etcd listens)."""
        self.switch.ip("addr", "add", f"{address}/{self.segments[segment].prefixlen}", "dev", segment)

    def start(self, ns: Netns, argv: tuple[str, ...] | list[str], label: str) -> Process:
        log_path = self.workdir / f"{label}-{len(self.processes)}.log"
        out = open(log_path, "wb")  # noqa: SIM115 - the child owns it from here
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        popen = subprocess.Popen(
            ns.cmd(*argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        out.close()
        proc = Process(popen, log_path, list(argv))
        self.processes.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.processes):
            proc.stop(timeout=5)
        for ns in reversed(self.namespaces):
            # Anything a test forgot (iperf3 -D, say) dies with SIGKILL before the namespace goes.
            pids = sh("ip", "netns", "pids", ns.name, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", ns.name, check=False)
        self.namespaces.clear()
        self._tmp.cleanup()


def cleanup_stale(prefix: str = "tpl") -> list[str]:
    """Delete namespaces left by a lab whose process died (kill -9); returns their names."""
    out = sh("ip", "netns", "list", check=False).stdout.split("\n")
    stale = [line.split()[0] for line in out if line.startswith(prefix)]
    for name in stale:
        for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        sh("ip", "netns", "del", name, check=False)
    return stale


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
from ipaddress import IPv4Network
import aetcd

async def main(host, port, count, length, first, ip_base):
    async with aetcd.Client(host, int(port), timeout=10) as client:
        grant = await client.lease(3600)
        t = client.transactions
        subnets = list(IPv4Network("10.100.0.0/16").subnets(new_prefix=int(length)))[int(first):]
        ops = []
        for i, net in enumerate(subnets[: int(count)]):
            key = f"/coreos.com/network/subnets/{net.network_address}-{net.prefixlen}".encode()
            public_ip = f"192.0.2.{int(ip_base) + i % 50}"
            value = json.dumps({"PublicIP": public_ip, "BackendType": "udp"}).encode()
            ops.append(t.put(key, value, lease=grant.id))
        for start in range(0, len(ops), 100):
            await client.transaction(compare=[], success=ops[start : start + 100], failure=[])
        print(grant.id, flush=True)

asyncio.run(main(*sys.argv[1:]))
"""


def bulk_leases(server: EtcdServer, count: int, subnet_len: int, first: int = 1, ip_base: int = 200) -> int:
    """Write ``count`` udp leases of /``subnet_len`` subnets of 10.100.0.0/16 (from the ``first``-th)
    into ``server`` as thousands of hosts would, all on one etcd lease; returns that lease's ID.

    The PublicIPs cycle through 192.0.2.``ip_base`` to ``ip_base + 49`` (addresses nobody holds).
    Runs where the server is reachable (its namespace); transactions of 100 puts.
    """
    argv = [sys.executable, "-c", _BULK, server.address, str(server.port), str(count), str(subnet_len)]
    argv += [str(first), str(ip_base)]
    if server.ns:
        out = server.ns.run(*argv, timeout=300)
    else:
        out = sh(*argv, timeout=300)
    return int(out.stdout.split()[-1])


_SINK = """
import hashlib, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
s.settimeout(float(sys.argv[3]))
print("listening", flush=True)
c, _ = s.accept()
c.settimeout(float(sys.argv[3]))
h, n = hashlib.sha256(), 0
while True:
    d = c.recv(1 << 16)
    if not d:
        break
    h.update(d)
    n += len(d)
print(n, h.hexdigest(), flush=True)
"""

_SOURCE = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[4]))
with open(sys.argv[3], "rb") as f:
    c.sendfile(f)
c.shutdown(socket.SHUT_WR)
c.recv(1)
"""


def transfer(
    src: Host, dst: Host, address: str, nbytes: int, port: int = 5201, timeout: float = 60
) -> tuple[str, str]:
    """TCP-send nbytes of random data from src to address on dst; return (sent, received) as 'len sha256'."""
    import hashlib

    payload = os.urandom(nbytes)
    path = src.lab.workdir / f"payload-{nbytes}"
    path.write_bytes(payload)
    sink = dst.start(sys.executable, "-c", _SINK, address, str(port), str(timeout), name="sink")
    sink.wait_for("listening", timeout=10)
    src.ns.run(
        sys.executable, "-c", _SOURCE, address, str(port), str(path), str(timeout), timeout=timeout + 5
    )
    try:
        sink.popen.wait(timeout)
    finally:
        sink.stop()
    received = sink.output().split("\n")[1].strip() if sink.output().count("\n") > 1 else sink.output()
    return f"{nbytes} {hashlib.sha256(payload).hexdigest()}", received
