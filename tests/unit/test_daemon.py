"""The daemon driven by a fake registry and a fake backend: no root, no etcd, no devices.

What a user sees of the daemon: which peers end up routed (and which never
do), what subnet.env says, what is logged once, and that it stops in one
line when a part of it dies.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from tunproxy.backends.base import Backend, BackendContext, PeerRefused, RouteTableFull
from tunproxy.daemon import Daemon, DaemonOptions
from tunproxy.model import Lease, LeaseAdded, LeaseRemoved, NetworkConfig
from tunproxy.netlink import Underlay
from tunproxy.peers.base import Changes, OwnLease, Registry, Snapshot, Update
from tunproxy.watcher import LeaseWatcher

CONFIG = NetworkConfig.parse({"Network": "10.100.0.0/16", "Backend": {"Type": "udp"}})
UNDERLAY = Underlay("eth9", 9, IPv4Address("192.0.2.11"), 24, 1500)
OURS = IPv4Network("10.100.5.0/24")


def net(third: int) -> IPv4Network:
    return IPv4Network(f"10.100.{third}.0/24")


def lease(third: int, host: int = 12, backend: str = "udp") -> Lease:
    return Lease(net(third), IPv4Address(f"192.0.2.{host}"), backend)


class FakeRegistry(Registry):
    """Our lease is 10.100.5.0/24; updates are whatever the test puts in ``feed`` (None ends them)."""

    def __init__(self) -> None:
        self.feed: asyncio.Queue[Update | None] = asyncio.Queue()
        self.closed = False

    async def network_config(self) -> NetworkConfig:
        return CONFIG

    async def acquire(self, public_ip: IPv4Address, backend_type: str, backend_data: Any) -> Lease:
        return Lease(OURS, public_ip, backend_type, backend_data)

    async def updates(self) -> AsyncIterator[Update]:
        while (update := await self.feed.get()) is not None:
            yield update

    def lease_expiry(self) -> float | None:
        return 1e9

    async def close(self) -> None:
        self.closed = True


class FakeBackend(Backend):
    """A route table in a dict. ``refuse`` maps a subnet to the error its addition raises."""

    name = "udp"

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self.routes: dict[IPv4Network, Lease] = {}
        self.subnets: list[IPv4Network] = []
        self.refuse: dict[IPv4Network, Exception] = {}
        self.events: list[str] = []
        self.checks = 0

    @property
    def mtu(self) -> int:
        return 1472

    async def open(self) -> None:
        self.events.append("open")

    async def set_subnet(self, subnet: IPv4Network) -> None:
        self.subnets.append(subnet)

    async def add_peer(self, lease: Lease) -> None:
        if lease.subnet in self.refuse:
            raise self.refuse[lease.subnet]
        self.routes[lease.subnet] = lease

    async def remove_peer(self, lease: Lease) -> None:
        self.routes.pop(lease.subnet, None)

    async def reconcile(self) -> None:  # the real one sweeps netlink
        self.events.append("reconcile")

    async def check(self) -> None:
        self.checks += 1

    async def close(self) -> None:
        self.events.append("close")


class Harness:
    def __init__(self, tmp_path: Path, check_interval: float = 3600) -> None:
        self.registry = FakeRegistry()
        self.backends: list[FakeBackend] = []
        self.subnet_file = tmp_path / "run" / "subnet.env"
        options = DaemonOptions(
            iface=None,
            public_ip=None,
            subnet_file=self.subnet_file,
            stats_interval=0,
            check_interval=check_interval,
        )
        self.daemon = Daemon(
            self.registry, options, find_underlay=lambda iface, ip: UNDERLAY, create_backend=self._backend
        )
        self.task: asyncio.Task[None] | None = None

    def _backend(self, ctx: BackendContext) -> FakeBackend:
        backend = FakeBackend(ctx)
        self.backends.append(backend)
        return backend

    @property
    def backend(self) -> FakeBackend:
        return self.backends[0]

    async def start(self) -> None:
        self.task = asyncio.create_task(self.daemon.run())
        await self.until(lambda: self.backends and self.backend.subnets)

    async def send(self, update: Update | None) -> None:
        await self.registry.feed.put(update)
        await self.until(lambda: self.registry.feed.empty())
        for _ in range(20):  # let the daemon finish applying what it took
            await asyncio.sleep(0)

    async def until(self, condition: Any, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                assert self.task is None or not self.task.done(), self.task.exception()
                await asyncio.sleep(0.001)

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


def test_peers_from_the_registry_are_routed_and_our_own_never(tmp_path: Path) -> None:
    async def main() -> Harness:
        h = Harness(tmp_path)
        await h.start()
        await h.send(Snapshot((lease(1), lease(2), lease(5, host=11), lease(7, host=11))))
        assert set(h.backend.routes) == {net(1), net(2)}  # 5 is our subnet, 7 names our public IP
        await h.send(Changes((LeaseRemoved(net(1)), LeaseAdded(lease(3)), LeaseAdded(lease(2, host=13)))))
        assert set(h.backend.routes) == {net(2), net(3)}
        assert h.backend.routes[net(2)].public_ip == IPv4Address("192.0.2.13")
        await h.stop()
        return h

    h = asyncio.run(main())
    assert h.backend.events == ["open", "reconcile", "close"]  # leftovers swept once, after the first list
    assert h.registry.closed
    assert h.subnet_file.read_text() == (
        "FLANNEL_NETWORK=10.100.0.0/16\nFLANNEL_SUBNET=10.100.5.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
    )


def test_a_peer_of_another_backend_is_said_once_and_never_routed(tmp_path: Path, caplog) -> None:
    async def main() -> Harness:
        h = Harness(tmp_path)
        await h.start()
        caplog.set_level(logging.WARNING, logger="tunproxy")
        await h.send(Snapshot((lease(1), lease(2, backend="vxlan"))))
        await h.send(Snapshot((lease(1), lease(2, backend="vxlan"))))
        assert set(h.backend.routes) == {net(1)}
        await h.stop()
        return h

    asyncio.run(main())
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert said == ["ignoring peer 10.100.2.0/24 (192.0.2.12): it runs backend vxlan, we run udp"]


def test_a_reacquired_lease_moves_our_subnet_and_drops_the_peer_that_had_it(tmp_path: Path) -> None:
    async def main() -> Harness:
        h = Harness(tmp_path)
        await h.start()
        await h.send(Snapshot((lease(1), lease(9))))
        await h.send(OwnLease(Lease(net(9), UNDERLAY.address, "udp")))
        assert set(h.backend.routes) == {net(1)}
        assert h.backend.subnets == [OURS, net(9)]
        await h.stop()
        return h

    h = asyncio.run(main())
    assert "FLANNEL_SUBNET=10.100.9.1/24" in h.subnet_file.read_text()


def test_a_refused_peer_is_said_once_and_added_when_the_backend_takes_it(tmp_path: Path, caplog) -> None:
    async def main() -> Harness:
        h = Harness(tmp_path, check_interval=0.01)
        await h.start()
        h.backend.refuse[net(2)] = PeerRefused("its lease has no VtepMAC")
        h.backend.refuse[net(3)] = RouteTableFull("route table full (1 routes)")
        caplog.set_level(logging.WARNING, logger="tunproxy")
        await h.send(Snapshot((lease(1), lease(2), lease(3))))
        assert set(h.backend.routes) == {net(1)} and set(h.daemon.waiting.leases) == {net(2), net(3)}
        await h.until(lambda: h.backend.checks >= 3)  # three periodic checks retried them: still one line
        h.backend.refuse.clear()
        await h.until(lambda: set(h.backend.routes) == {net(1), net(2), net(3)})
        assert h.daemon.waiting.leases == {}
        await h.stop()
        return h

    asyncio.run(main())
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert said == [
        "peer 10.100.2.0/24 (192.0.2.12) refused: its lease has no VtepMAC",
        "route table full: not routing 1 peer(s) (10.100.3.0/24); they are added when room "
        "frees (raise --max-routes to hold more)",
    ]


def test_a_removed_lease_that_was_waiting_is_forgotten_not_removed(tmp_path: Path) -> None:
    class Counting(FakeBackend):
        removed: list[IPv4Network] = []

        async def apply(
            self, removed: Sequence[Lease], added: Sequence[Lease]
        ) -> list[tuple[Lease, Exception]]:
            self.removed += [x.subnet for x in removed]
            return await super().apply(removed, added)

    async def main() -> Harness:
        h = Harness(tmp_path)
        h.daemon._create_backend = lambda ctx: h.backends.append(Counting(ctx)) or h.backends[-1]
        await h.start()
        h.backend.refuse[net(2)] = PeerRefused("unreachable")
        await h.send(Snapshot((lease(1), lease(2))))
        await h.send(Changes((LeaseRemoved(net(2)), LeaseRemoved(net(1)))))
        assert h.backend.removed == [net(1)] and h.daemon.waiting.leases == {}  # type: ignore[attr-defined]
        await h.stop()
        return h

    asyncio.run(main())


def test_a_registry_whose_updates_end_stops_the_daemon_in_one_line(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        await h.start()
        await h.send(Snapshot((lease(1),)))
        await h.registry.feed.put(None)
        assert h.task is not None
        with pytest.raises(BaseExceptionGroup) as group:
            await h.task
        assert [str(e) for e in group.value.exceptions] == [
            "the lease watch stopped although the daemon is running"
        ]
        assert h.backend.events[-1] == "close"

    asyncio.run(main())


def test_a_burst_larger_than_a_chunk_is_applied_whole(tmp_path: Path) -> None:
    async def main() -> Harness:
        h = Harness(tmp_path)
        await h.start()
        peer = UNDERLAY.address + 1
        many = tuple(Lease(IPv4Network((0x0A640000 + (n << 4), 28)), peer) for n in range(1300))
        await h.send(Snapshot(many))
        await h.until(lambda: len(h.backend.routes) == 1300)
        await h.send(Snapshot(many[:10]))
        await h.until(lambda: len(h.backend.routes) == 10)
        await h.stop()
        return h

    asyncio.run(main())


def test_each_refused_lease_is_tried_once_per_burst(tmp_path: Path) -> None:
    """With a full table, a burst must not offer what it just saw refused a second time."""

    async def main() -> dict[IPv4Network, int]:
        h = Harness(tmp_path)
        await h.start()
        tries: dict[IPv4Network, int] = {}
        backend = h.backend
        plain_add = backend.add_peer

        async def counted(lease: Lease) -> None:
            tries[lease.subnet] = tries.get(lease.subnet, 0) + 1
            await plain_add(lease)

        backend.add_peer = counted  # type: ignore[method-assign]
        for third in (1, 2, 3):
            backend.refuse[net(third)] = RouteTableFull("route table full (0 routes)")
        await h.send(Snapshot((lease(1), lease(2))))
        assert tries == {net(1): 1, net(2): 1}
        await h.send(Changes((LeaseAdded(lease(3)),)))  # the two waiting, and the new one: once each
        assert tries == {net(1): 2, net(2): 2, net(3): 1}
        await h.stop()
        return tries

    asyncio.run(main())


class OneRouteBackend:
    """A backend whose table holds one route; records every apply call."""

    name = "udp"

    def __init__(self) -> None:
        self.routes: dict[IPv4Network, Lease] = {}
        self.calls: list[tuple[list[IPv4Network], list[IPv4Network]]] = []

    async def apply(self, removed: Sequence[Lease], added: Sequence[Lease]) -> list[tuple[Lease, Exception]]:
        self.calls.append(([lease.subnet for lease in removed], [lease.subnet for lease in added]))
        for lease in removed:
            self.routes.pop(lease.subnet, None)
        failures: list[tuple[Lease, Exception]] = []
        for lease in added:
            if lease.subnet not in self.routes and len(self.routes) >= 1:
                failures.append((lease, RouteTableFull("route table full (1 routes)")))
            else:
                self.routes[lease.subnet] = lease
        return failures


def small(n: int) -> Lease:
    """The ``n``th /27 lease: many fit in one /16."""
    return Lease(IPv4Network(f"10.100.{n // 8}.{n % 8 * 32}/27"), IPv4Address("192.0.2.12"), "udp")


def test_a_waiting_lease_is_retried_once_per_burst_after_its_removals() -> None:
    """A revocation of 1,200 peers used to offer the waiting lease again in every chunk of 512,
    adding it and removing it within the burst, and logging additions nobody made."""

    async def main() -> OneRouteBackend:
        daemon = Daemon(None, DaemonOptions(iface=None, public_ip=None, subnet_file=None))  # type: ignore[arg-type]
        backend = daemon.backend = OneRouteBackend()  # type: ignore[assignment]
        daemon.watcher = LeaseWatcher("udp")
        await daemon._apply(daemon.watcher.reset([small(1), small(2)]))
        assert set(backend.routes) == {small(1).subnet} and set(daemon.waiting.leases) == {small(2).subnet}
        burst = [LeaseAdded(small(n)) for n in range(10, 1210)]
        await daemon._apply(daemon.watcher.update(burst))
        backend.calls.clear()
        await daemon._apply(
            daemon.watcher.update([LeaseRemoved(small(n).subnet) for n in (1, *range(10, 1210))])
        )
        return backend

    backend = asyncio.run(main())
    offered = [added for _, added in backend.calls if small(2).subnet in added]
    assert offered == [[small(2).subnet]]  # once, after every removal
    assert set(backend.routes) == {small(2).subnet}
