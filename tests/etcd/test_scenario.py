"""The deleted-key scenario over the fake etcd and a real one: the keeper and EtcdRegistry agree."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from tunproxy.etcd.registry import EtcdRegistry
from tunproxy.model import Lease
from tunproxy.peers.base import OwnLease, Snapshot

from .scenario import CONFIG, MARGIN, PUBLIC_IP, TTL, FakeWorld, deleted_key_scenario
from .test_registry import Follower, admin, key, put_config, registry, run, truth


class RealWorld:
    """EtcdRegistry on a real etcd; waits are for conditions, each bounded."""

    def __init__(self, etcd: Any) -> None:
        self.etcd = etcd
        self.reg: EtcdRegistry = registry(etcd.endpoint, ttl=TTL, margin=MARGIN)
        self.follower: Follower | None = None

    async def acquire(self) -> Lease:
        await put_config(self.etcd, CONFIG)
        lease = await self.reg.acquire(PUBLIC_IP, "udp", None)
        self.follower = Follower(self.reg)
        assert isinstance(await self.follower.next(), Snapshot)
        return lease

    def etcd_lease(self) -> int | None:
        return self.reg.keeper.etcd_lease

    def problem(self) -> str | None:
        return self.reg.lease_problem

    async def renewed(self) -> None:
        before = self.reg.keeper.expires_at
        assert before is not None
        async with asyncio.timeout(10):
            while (self.reg.keeper.expires_at or 0) <= before:
                await asyncio.sleep(0.05)

    async def delete_own_key(self) -> None:
        lease = self.reg.own_lease
        assert lease is not None
        async with admin(self.etcd) as client:
            await client.delete(key(str(lease.subnet)))

    async def own_lease_reported(self) -> Lease:
        assert self.follower is not None
        update = await self.follower.until(lambda u: isinstance(u, OwnLease))
        assert isinstance(update, OwnLease)
        return update.lease

    async def held(self) -> dict[IPv4Network, IPv4Address]:
        return {IPv4Network(s): IPv4Address(a) for s, a in (await truth(self.etcd)).items()}

    async def close(self) -> None:
        if self.follower is not None:
            await self.follower.stop()
        await self.reg.close()


@pytest.mark.parametrize("world", ["fake", pytest.param("etcd", marks=pytest.mark.etcd)])
def test_a_deleted_own_key_is_taken_again_and_reported(world: str, request: pytest.FixtureRequest) -> None:
    if world == "fake":
        asyncio.run(deleted_key_scenario(FakeWorld()))
        return
    real = RealWorld(request.getfixturevalue("etcd"))

    async def main() -> None:
        try:
            await deleted_key_scenario(real)
        finally:
            await real.close()

    run(main())
