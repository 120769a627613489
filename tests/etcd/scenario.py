"""One scenario, two worlds: the pure keeper on a fake etcd, and EtcdRegistry on a real one.

``deleted_key_scenario`` acquires, sees a renewal, has our key deleted
behind our back, and expects the same subnet back, reported as OwnLease.
``FakeWorld`` runs it through ``FakeHost`` (a fake clock; the unit tier
runs it); tests/etcd/test_scenario.py runs it through EtcdRegistry against
a real etcd as well. Both must agree.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Protocol

from tunproxy.model import Lease, NetworkConfig

from .fake import FakeClock, FakeEtcd, FakeHost

PUBLIC_IP = IPv4Address("192.0.2.1")
CONFIG = {"Network": "10.100.0.0/16", "Backend": {"Type": "udp"}}
TTL, MARGIN = 4.0, 3.0  # a renewal every second


class World(Protocol):
    async def acquire(self) -> Lease: ...

    def etcd_lease(self) -> int | None: ...

    def problem(self) -> str | None: ...

    async def renewed(self) -> None:
        """Until a renewal went through (the lease's expiry moved on)."""

    async def delete_own_key(self) -> None: ...

    async def own_lease_reported(self) -> Lease:
        """Until the registry hands over OwnLease; its lease."""

    async def held(self) -> dict[IPv4Network, IPv4Address]:
        """What the store holds: subnet -> public IP."""


async def deleted_key_scenario(world: World) -> None:
    lease = await world.acquire()
    first = world.etcd_lease()
    assert first
    assert await world.held() == {lease.subnet: PUBLIC_IP}
    await world.renewed()
    assert world.etcd_lease() == first  # renewing keeps the etcd lease
    await world.delete_own_key()
    again = await world.own_lease_reported()
    assert again == lease  # the subnet was free: the same one, the same value
    assert await world.held() == {lease.subnet: PUBLIC_IP}
    assert world.etcd_lease() not in (0, first)
    assert world.problem() is None


class FakeWorld:
    def __init__(self) -> None:
        self.host = FakeHost(FakeEtcd(FakeClock()), NetworkConfig.parse(CONFIG), PUBLIC_IP, TTL, MARGIN)

    async def acquire(self) -> Lease:
        return self.host.start()

    def etcd_lease(self) -> int | None:
        return self.host.keeper.etcd_lease

    def problem(self) -> str | None:
        return self.host.keeper.problem

    async def renewed(self) -> None:
        before = self.host.keeper.expires_at
        assert before is not None
        await self.host.drive(self.host.keeper.renew_at)
        assert self.host.keeper.expires_at is not None and self.host.keeper.expires_at > before

    async def delete_own_key(self) -> None:
        lease = self.host.keeper.lease
        assert lease is not None
        self.host.etcd.delete(lease.subnet)

    async def own_lease_reported(self) -> Lease:
        await self.host.drive(self.host.clock.now)
        assert self.host.reports
        return self.host.reports[-1]

    async def held(self) -> dict[IPv4Network, IPv4Address]:
        return {subnet: lease.public_ip for subnet, (lease, _) in self.host.etcd.keys.items()}
