"""An in-memory etcd and a fake clock, and a host driving a ``Keeper`` against them.

The double of what ``EtcdRegistry`` does with a real etcd: ``FakeHost`` runs
the keeper's actions the same way (renew -> ``renewed``, read our key ->
``verified``, acquire with ``plan_acquisition`` -> ``reacquired``), and the
store tells it what a watch would see of our key. Time moves only when a
test (or ``run_until``) moves it: no sleeps.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network

from tunproxy.etcd.acquire import Entry, PlanKind, plan_acquisition
from tunproxy.etcd.keeper import Held, Keeper, Reacquire, Renew, Report, RevokeUnused, Stored, Verify, Wait
from tunproxy.model import ConfigError, Lease, NetworkConfig


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


class FakeHost:
    """A host keeping its lease in a ``FakeEtcd``, as EtcdRegistry does in etcd."""

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
        etcd.watchers.append(self.keeper.observed)

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

    def run_until(self, deadline: float) -> None:
        """Run the keeper's actions, moving the clock from wait to wait, up to ``deadline``."""
        keeper = self.keeper
        while True:
            action = keeper.poll(self.clock.now)
            if isinstance(action, Wait):
                if action.until > deadline:
                    self.clock.now = max(self.clock.now, deadline)
                    return
                self.clock.now = max(self.clock.now, action.until)
            elif isinstance(action, Report):
                self.reports.append(action.lease)
            elif isinstance(action, RevokeUnused):
                for lease_id in action.ids:
                    try:
                        self.etcd.revoke(lease_id)
                    except ConnectionError:
                        keeper.revoke_failed(self.clock.now)
                        break
                    keeper.revoked(lease_id)
            else:
                self.step(action)

    def step(self, action: Renew | Verify | Reacquire) -> None:
        keeper = self.keeper
        try:
            if isinstance(action, Renew):
                keeper.renewed(self.clock.now, self.etcd.refresh(action.etcd_lease))
            elif isinstance(action, Verify):
                keeper.verified(self.clock.now, self.etcd.get(action.subnet))
            else:
                try:
                    held = self.acquire(action.previous)
                except ConfigError as e:
                    keeper.reacquire_failed(self.clock.now, str(e))
                else:
                    keeper.reacquired(self.clock.now, held)
        except ConnectionError:
            keeper.failed(self.clock.now)

    def run_for(self, seconds: float) -> None:
        self.run_until(self.clock.now + seconds)
