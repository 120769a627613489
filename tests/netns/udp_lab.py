"""Helpers for the udp data-path tests: a lab of hosts running `tunproxy run` with static peers."""

from __future__ import annotations

import re
import time

from tunproxy.lab import Host, Lab, Process

NETWORK = "10.100.0.0/16"
HOSTS = {
    "h1": ("192.0.2.11", "10.100.5.0/24"),
    "h2": ("192.0.2.12", "10.100.18.0/24"),
    "h3": ("192.0.2.13", "10.100.7.0/24"),
}


def overlay(name: str) -> str:
    """The address a host's tunproxy puts on its TUN: its subnet's first address."""
    return HOSTS[name][1].split("/")[0]


def build(lab: Lab, names=("h1", "h2", "h3"), stranger: bool = False) -> dict[str, Host]:
    lab.segment("br0", "192.0.2.0/24")
    hosts = {name: lab.add_host(name, "br0", HOSTS[name][0]) for name in names}
    if stranger:
        hosts["h9"] = lab.add_host("h9", "br0", "192.0.2.99")
    return hosts


def start(host: Host, *extra: str, peers: tuple[str, ...] | None = None) -> Process:
    name = host.name
    peers = peers if peers is not None else tuple(p for p in HOSTS if p != name)
    flags = [f"--peer={HOSTS[p][0]}={HOSTS[p][1]}" for p in peers]
    proc = host.tunproxy("--network", NETWORK, "--subnet", HOSTS[name][1], *flags, *extra)
    proc.wait_for("our subnet is", timeout=15)
    return proc


def counter(proc: Process, name: str, wait_for_new: bool = True, timeout: float = 5) -> int:
    """The latest value of a counter from the daemon's periodic one-line stats (needs --stats-interval)."""
    before = proc.output().count("stats:")
    deadline = time.monotonic() + timeout
    while wait_for_new and proc.output().count("stats:") <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [line for line in proc.output().splitlines() if "stats:" in line]
    assert lines, f"no stats line yet:\n{proc.output()[-2000:]}"
    found = re.search(rf"\b{name}=(\d+)", lines[-1])
    assert found, f"no counter {name} in {lines[-1]}"
    return int(found.group(1))
