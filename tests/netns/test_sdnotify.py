"""systemd readiness: this test plays systemd's side of NOTIFY_SOCKET."""

from __future__ import annotations

import socket
import sys
import time

import pytest

from .labkit import HOSTS, NETWORK, build_udp

pytestmark = pytest.mark.root


def next_message(sock: socket.socket, timeout: float = 20) -> str:
    sock.settimeout(timeout)
    return sock.recv(4096).decode()


def test_ready_only_after_the_peer_routes_exist_then_watchdog_and_stopping(lab):
    hosts = build_udp(lab, names=("h1", "h2"))
    h1 = hosts["h1"]
    path = lab.workdir / "notify.sock"
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(path))
    try:
        proc = h1.start(
            "env",
            f"NOTIFY_SOCKET={path}",
            "WATCHDOG_USEC=400000",
            sys.executable,
            "-m",
            "tunproxy",
            "run",
            "--iface",
            "eth1",
            "--subnet-file",
            str(lab.workdir / "h1-subnet.env"),
            "--network",
            NETWORK,
            "--subnet",
            HOSTS["h1"][1],
            "--backend",
            "host-gw",
            f"--peer={HOSTS['h2'][0]}={HOSTS['h2'][1]}",
            name="tunproxy",
        )
        messages = []
        while not any("READY=1" in m for m in messages):
            messages.append(next_message(systemd))
        # systemd would now start what depends on the overlay: the peer's route must be there.
        route = h1.ns.ip("-4", "route", "show", HOSTS["h2"][1]).stdout
        assert f"via {HOSTS['h2'][0]} dev eth1" in route
        ready = messages[-1]
        assert f"STATUS=ready: subnet {HOSTS['h1'][1]}, 1 peer, backend host-gw" in ready.splitlines()
        assert all("READY=1" not in m for m in messages[:-1])
        assert any(m.startswith("STATUS=") for m in messages[:-1])  # it said what it was doing before

        pings = 0
        while pings < 2:
            pings += next_message(systemd, timeout=5) == "WATCHDOG=1"
        proc.popen.terminate()
        rest = []
        deadline = time.monotonic() + 15
        while not any("STOPPING=1" in m for m in rest) and time.monotonic() < deadline:
            rest.append(next_message(systemd))
        assert any(m.splitlines()[0] == "STOPPING=1" for m in rest)
        assert proc.popen.wait(10) == 0
    finally:
        systemd.close()
