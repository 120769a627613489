"""A lab of network namespaces: hosts on bridged underlay segments, for the demo, tests and bench.

Every name starts with a per-lab prefix, every process is tracked by PID, and
``close()`` (also on exceptions, via ``with Lab() as lab``) kills what it
started and deletes every namespace, so a failed run leaves nothing behind.
The switch namespace holds one bridge per segment; an extra address on a
bridge (e.g. for etcd) lives there too, so nothing touches the host's own
network. Which hosts sit at which addresses is lab/hosts.py's; etcd in the
lab is lab/etcd.py's.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
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


def cleanup_dead_labs(prefix: str = "tpl") -> list[str]:
    """Delete the namespaces of labs whose process is gone; returns their names.

    A lab's namespaces are named ``<prefix><pid>...`` (``tpl1234x7-h1``,
    ``tpbench1234-h1``), so a run killed before its teardown (kill -9, a
    session cut short) is recognised by its dead pid; a live run's stay,
    even one in another checkout.
    """
    removed = []
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        found = re.match(rf"{re.escape(prefix)}(\d+)\D", line)  # the pid whole: 12 is not 123
        if not found:
            continue
        try:
            os.kill(int(found.group(1)), 0)
        except ProcessLookupError:
            removed += cleanup_stale(found.group(0))
        except PermissionError:
            pass  # someone else's live process
    return removed


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
