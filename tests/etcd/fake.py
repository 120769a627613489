"""An in-memory etcd and a fake clock, and a host keeping its lease in them.

``FakeHost`` runs the keeper with the daemon's own ``KeepLoop`` (what
``EtcdRegistry`` runs on a real etcd), the in-memory etcd as its store; the
store tells the keeper what a watch would see of our key. Time moves only
when a test (or ``run_until``) moves it: no sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network

from tunproxy.etcd.acquire import Entry, PlanKind, plan_acquisition
from tunproxy.etcd.keep_loop import KeepLoop, LeaseStore
from tunproxy.etcd.keeper import Held, Keeper, Stored
from tunproxy.model import Lease, NetworkConfig


class FakeClock:
    """Monotonic seconds that move only when told."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeEtcd:
    """Keys under ``subnets/`` with their etcd leases; leases expire by the fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.keys: dict[IPv4Network, tuple[Lease, int]] = {}
        self.leases: dict[int, float] = {}  # id -> expiry (fake clock)
        self.granted_ttl: dict[int, float] = {}
        self.watchers: list[Callable[[IPv4Network, Lease | None], None]] = []
        self.fail_next = 0  # the next n calls raise ConnectionError
        self.calls: list[tuple[float, str]] = []
        self._next_id = 0x1000

    def _call(self, what: str) -> None:
        self.calls.append((self.clock.now, what))
        self._expire()
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError(f"{what}: etcd unreachable")

    def _expire(self) -> None:
        for lease_id, at in list(self.leases.items()):
            if at <= self.clock.now:
                self._drop_lease(lease_id)

    def _drop_lease(self, lease_id: int) -> None:
        del self.leases[lease_id]
        for subnet, (_, attached) in list(self.keys.items()):
            if attached == lease_id:
                self.delete(subnet)

    def grant(self, ttl: float) -> int:
        self._call("grant")
        self._next_id += 1
        self.leases[self._next_id] = self.clock.now + ttl
        self.granted_ttl[self._next_id] = ttl
        return self._next_id

    def refresh(self, lease_id: int) -> float:
        """Keep-alive: the TTL now left, or -1 if the lease is gone (etcd's LeaseKeepAlive)."""
        self._call("refresh")
        if lease_id not in self.leases:
            return -1
        ttl = self.granted_ttl[lease_id]
        self.leases[lease_id] = self.clock.now + ttl
        return ttl

    def revoke(self, lease_id: int) -> None:
        self._call("revoke")
        if lease_id in self.leases:
            self._drop_lease(lease_id)

    def get(self, subnet: IPv4Network) -> Stored | None:
        self._call("get")
        if subnet not in self.keys:
            return None
        lease, lease_id = self.keys[subnet]
        return Stored(lease, lease_id)

    def put(self, lease: Lease, lease_id: int = 0) -> None:
        self.keys[lease.subnet] = (lease, lease_id)
        for watch in self.watchers:
            watch(lease.subnet, lease)

    def delete(self, subnet: IPv4Network) -> None:
        if self.keys.pop(subnet, None) is not None:
            for watch in self.watchers:
                watch(subnet, None)


class Paused(Exception):
    """The keep loop reached the deadline ``FakeHost`` runs it to."""


class FakeHost:
    """A host keeping its lease in a ``FakeEtcd``: the keeper run by the daemon's own
    ``KeepLoop``, with the fake as its store, up to a deadline on the fake clock."""

    def __init__(
        self, etcd: FakeEtcd, config: NetworkConfig, public_ip: IPv4Address, ttl: float, margin: float
    ) -> None:
        self.etcd = etcd
        self.clock = etcd.clock
        self.config = config
        self.desired = Lease(config.network, public_ip, "udp")
        self.keeper = Keeper(ttl, margin)
        self.reports: list[Lease] = []
        self.rng = random.Random(1)
        self.deadline = 0.0
        etcd.watchers.append(self.keeper.observed)
        store = LeaseStore(
            refresh=self._refresh,
            read=self._read,
            reacquire=self._reacquire,
            revoke=self._revoke,
            wait=self._wait,
            report=self.reports.append,
        )
        self.loop = KeepLoop(self.keeper, store, self.clock, retryable=(ConnectionError,))

    def acquire(self, previous: IPv4Network | None = None) -> Held:
        entries = [Entry(s, lease, lease_id) for s, (lease, lease_id) in self.etcd.keys.items()]
        plan = plan_acquisition(self.config, entries, self.desired, previous, self.rng)
        lease = dataclasses.replace(self.desired, subnet=plan.subnet)
        if plan.kind is PlanKind.RESERVED:
            return Held(lease)
        lease_id = self.etcd.grant(self.keeper.ttl)
        self.etcd.put(lease, lease_id)
        return Held(lease, lease_id, self.keeper.ttl)

    def start(self) -> Lease:
        held = self.acquire()
        self.keeper.acquired(self.clock.now, held)
        return held.lease

    async def drive(self, deadline: float) -> None:
        """Run the keep loop, the clock moving from wait to wait, up to ``deadline``."""
        self.deadline = deadline
        with contextlib.suppress(Paused):
            await self.loop.run()

    def run_until(self, deadline: float) -> None:
        """``drive`` from outside an event loop."""
        asyncio.run(self.drive(deadline))

    def run_for(self, seconds: float) -> None:
        self.run_until(self.clock.now + seconds)

    # the store, as KeepLoop calls it

    async def _refresh(self, etcd_lease: int) -> float:
        return self.etcd.refresh(etcd_lease)

    async def _read(self, subnet: IPv4Network) -> Stored | None:
        return self.etcd.get(subnet)

    async def _reacquire(self, previous: IPv4Network | None) -> tuple[float, Held]:
        return self.clock.now, self.acquire(previous)

    async def _revoke(self, etcd_lease: int) -> None:
        self.etcd.revoke(etcd_lease)

    async def _wait(self, until: float) -> None:
        if until > self.deadline:
            self.clock.now = max(self.clock.now, self.deadline)
            raise Paused
        self.clock.now = max(self.clock.now, until)
