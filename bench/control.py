"""``python -m bench.control``: the control path's cost per lease change, at 10 and at 2,000 peers.

What a lease removal costs the udp backend, measured on its real code
(``UdpBackend.apply`` on a real ``FastPath``; no devices, so no root), against
the way it was done before (a Python copy of the whole table to check
membership, then one C removal), in the same run. Prints a table and writes
``bench/results/control-<timestamp>.json``. Times are medians of repeats, in
microseconds; only the ratios between rows of one run mean anything.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import os
import platform
import statistics
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from tunproxy.backend_config import UdpFlags
from tunproxy.backends.base import BackendContext
from tunproxy.backends.udp import UdpBackend
from tunproxy.fastpath import FastPath
from tunproxy.model import Lease, NetworkConfig
from tunproxy.netlink import Underlay

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CONFIG = NetworkConfig.parse({"Network": "10.100.0.0/16", "SubnetLen": 29, "Backend": {"Type": "udp"}})


def _leases(count: int) -> list[Lease]:
    subnets = list(CONFIG.network.subnets(new_prefix=29))[1 : count + 1]
    return [Lease(s, IPv4Address(f"192.0.2.{1 + i % 200}"), "udp") for i, s in enumerate(subnets)]


def _backend(leases: list[Lease]) -> UdpBackend:
    underlay = Underlay("eth1", 2, IPv4Address("192.0.2.250"), 24, 1500)
    backend = UdpBackend(BackendContext(CONFIG, underlay, underlay.address, UdpFlags(offload=False)))
    backend.fastpath = FastPath(mtu=1472, local_addr="10.100.0.0", batch=1, max_routes=backend.max_routes)
    asyncio.run(backend.apply((), leases))
    return backend


def _old_remove(fastpath: FastPath, subnet: IPv4Network) -> None:
    """How UdpBackend.remove_peer did it before: copy the table to Python to test membership."""
    if subnet in fastpath.routes():
        fastpath.remove_route(subnet)


def one_removal(peers: int, repeats: int) -> dict[str, float]:
    """Median microseconds to remove one peer (and put it back, untimed) from a table of ``peers``."""
    leases = _leases(peers)
    backend = _backend(leases)
    assert backend.fastpath is not None
    victim = leases[peers // 2]
    new, old = [], []
    loop = asyncio.new_event_loop()
    gc.disable()  # as timeit does: a collection triggered by one variant must not land in the other
    try:
        for _ in range(repeats):
            t = time.perf_counter()
            loop.run_until_complete(backend.apply((victim,), ()))
            new.append(time.perf_counter() - t)
            loop.run_until_complete(backend.apply((), (victim,)))
        for _ in range(repeats):
            t = time.perf_counter()
            _old_remove(backend.fastpath, victim.subnet)
            old.append(time.perf_counter() - t)
            backend.fastpath.add_route(victim.subnet, victim.public_ip)
    finally:
        gc.enable()
        loop.close()
    return {"new_us": statistics.median(new) * 1e6, "old_us": statistics.median(old) * 1e6}


def burst_removal(peers: int, repeats: int) -> dict[str, float]:
    """Median microseconds to remove all ``peers`` at once: one apply, against one removal each."""
    leases = _leases(peers)
    new, old = [], []
    for _ in range(repeats):
        backend = _backend(leases)
        t = time.perf_counter()
        asyncio.run(backend.apply(leases, ()))
        new.append(time.perf_counter() - t)
        backend = _backend(leases)
        assert backend.fastpath is not None
        t = time.perf_counter()
        for lease in leases:
            _old_remove(backend.fastpath, lease.subnet)
        old.append(time.perf_counter() - t)
    return {"new_us": statistics.median(new) * 1e6, "old_us": statistics.median(old) * 1e6}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.control", description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=200, help="timed repeats per single removal (default 200)")
    p.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help=f"where the JSON goes (default {RESULTS_DIR})"
    )
    args = p.parse_args(argv)
    rows: list[dict[str, Any]] = []
    for peers in (10, 2000, 5000):
        rows.append({"test": "one removal", "peers": peers, **one_removal(peers, args.repeats)})
    rows.append({"test": "remove all at once", "peers": 2000, **burst_removal(2000, 3)})
    print(f"{'test':<20} {'peers':>6} {'now, us':>10} {'before, us':>11} {'speed-up':>9}")
    for row in rows:
        speedup = row["old_us"] / row["new_us"]
        test, peers, now, before = row["test"], row["peers"], row["new_us"], row["old_us"]
        print(f"{test:<20} {peers:>6} {now:>10.1f} {before:>11.1f} {speedup:>8.0f}x")
    single = {row["peers"]: row["new_us"] for row in rows if row["test"] == "one removal"}
    print(f"one removal at 2,000 peers costs {single[2000] / single[10]:.2f}x what it costs at 10")
    stamp = dt.datetime.now(dt.UTC)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"control-{stamp:%Y%m%d-%H%M%S}.json"
    doc = {
        "measured": stamp.isoformat(),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "rows": rows,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
