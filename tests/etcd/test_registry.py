"""The etcd registry against a real etcd (one per test), on uvloop as the daemon runs it.

Every scenario is bounded by ``run(..., timeout)``; waits for an update use
``Follower``, which drains ``updates()`` into a queue so a test can time out
on a read without closing the registry's generator.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import aetcd
import pytest
import uvloop

from lab.netns import free_port
from tunproxy.etcd.connection import EtcdSettings
from tunproxy.etcd.listing import list_leases
from tunproxy.etcd.registry import EtcdRegistry
from tunproxy.etcd.table import format_leases
from tunproxy.model import ConfigError, Lease, LeaseAdded, LeaseRemoved
from tunproxy.peers.base import Changes, OwnLease, Snapshot, Update
from tunproxy.watcher import LeaseWatcher

from .proxy import TcpProxy

pytestmark = pytest.mark.etcd

PREFIX = "/coreos.com/network"
CONFIG = {"Network": "10.100.0.0/16", "Backend": {"Type": "udp"}}
LOGGER = "tunproxy.etcd"  # the package: its modules log under it


def run(coro: Awaitable[Any], timeout: float = 30) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return uvloop.run(bounded())


def ip(n: int) -> IPv4Address:
    return IPv4Address(f"192.0.2.{n}")


def key(subnet: str) -> bytes:
    net = IPv4Network(subnet)
    return f"{PREFIX}/subnets/{net.network_address}-{net.prefixlen}".encode()


def value(public_ip: IPv4Address | str, backend: str = "udp") -> bytes:
    return json.dumps({"PublicIP": str(public_ip), "BackendType": backend}).encode()


def admin(etcd) -> aetcd.Client:  # type: ignore[no-untyped-def]
    return aetcd.Client("127.0.0.1", etcd.port, timeout=5)


async def put_config(etcd, doc: Any = None) -> None:  # type: ignore[no-untyped-def]
    async with admin(etcd) as client:
        raw = doc if isinstance(doc, (str, bytes)) else json.dumps(doc or CONFIG)
        await client.put(f"{PREFIX}/config".encode(), raw.encode() if isinstance(raw, str) else raw)


def registry(endpoints: str, ttl: float = 30, margin: float = 10, **kw: Any) -> EtcdRegistry:
    return EtcdRegistry(EtcdSettings.create(endpoints, PREFIX), ttl=ttl, renew_margin=margin, **kw)


class Follower:
    """Drains a registry's updates() into a queue, folding them through a LeaseWatcher."""

    def __init__(self, reg: EtcdRegistry, own: IPv4Network | None = None) -> None:
        self.reg = reg
        self.queue: asyncio.Queue[Update] = asyncio.Queue()
        self.seen: list[Update] = []
        self.watcher = LeaseWatcher("udp", own_subnet=own)
        self.task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        async for update in self.reg.updates():
            await self.queue.put(update)

    async def next(self, timeout: float = 10) -> Update:
        update = await asyncio.wait_for(self.queue.get(), timeout)
        self.seen.append(update)
        if isinstance(update, Snapshot):
            self.watcher.reset(update.leases)
        elif isinstance(update, Changes):
            self.watcher.update(update.events)
        elif isinstance(update, OwnLease):
            self.watcher.set_own_subnet(update.lease.subnet)
        return update

    async def until(self, predicate: Callable[[Update], bool], timeout: float = 10) -> Update:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            update = await self.next(max(0.01, deadline - loop.time()))
            if predicate(update):
                return update

    async def table_until(self, predicate: Callable[[dict[IPv4Network, Lease]], bool],
                          timeout: float = 10) -> dict[IPv4Network, Lease]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self.watcher.leases):
            await self.next(max(0.01, deadline - loop.time()))
        return self.watcher.leases

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def table(leases: dict[IPv4Network, Lease]) -> dict[str, str]:
    return {str(s): str(lease.public_ip) for s, lease in leases.items()}


async def truth(etcd) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """What etcd holds, as subnet -> public ip (valid leases only)."""
    async with admin(etcd) as client:
        out = {}
        for kv in await client.get_prefix(f"{PREFIX}/subnets/".encode()):
            try:
                lease = Lease.parse(kv.key.decode(), kv.value)
            except ValueError:
                continue
            out[str(lease.subnet)] = str(lease.public_ip)
        return out


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith(LOGGER) and text in r.getMessage()]


async def wait_for_log(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 5) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not messages(caplog, text):
        assert loop.time() < deadline, f"no log line with {text!r}"
        await asyncio.sleep(0.05)


# --- the network config -------------------------------------------------------


def test_missing_config_waits_then_proceeds(etcd, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def main() -> None:
        reg = registry(etcd.endpoint)
        task = asyncio.create_task(reg.network_config())
        await asyncio.sleep(2.0)
        assert not task.done()
        await put_config(etcd)
        config = await asyncio.wait_for(task, 5)
        assert str(config.network) == "10.100.0.0/16"
        await reg.close()

    run(main())
    assert len(messages(caplog, "no network config at /coreos.com/network/config")) == 1


def test_bad_config_logged_once_then_fixed(etcd, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def main() -> None:
        await put_config(etcd, "{not json")
        reg = registry(etcd.endpoint)
        task = asyncio.create_task(reg.network_config())
        await wait_for_log(caplog, "not valid JSON")
        await asyncio.sleep(2.0)  # more retries, no more lines
        assert not task.done()
        assert len(messages(caplog, "not valid JSON")) == 1
        await put_config(etcd, {"Network": "10.100.0.0/16", "SubnetLen": 31})
        await wait_for_log(caplog, "SubnetLen must be /30 or shorter", timeout=8)
        assert not task.done()
        await put_config(etcd, {"Network": "10.9.0.0/16", "SubnetLen": 20})
        config = await asyncio.wait_for(task, 8)
        assert (str(config.network), config.subnet_len) == ("10.9.0.0/16", 20)
        await reg.close()

    run(main())
    assert len(messages(caplog, "not valid JSON")) == 1
    assert len(messages(caplog, "SubnetLen must be /30 or shorter")) == 1


def test_a_backend_change_at_runtime_is_an_error_and_not_applied(etcd, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def main() -> None:
        await put_config(etcd)
        reg = registry(etcd.endpoint)
        reg.config_poll = 0.2
        await reg.acquire(ip(1), "udp", None)
        updates = reg.updates()
        await asyncio.wait_for(updates.__anext__(), 5)
        await put_config(etcd, {"Network": "10.100.0.0/16", "Backend": {"Type": "vxlan"}})
        await wait_for_log(caplog, "Backend.Type changed in etcd from udp to vxlan")
        await asyncio.sleep(1.0)  # said once, not every poll
        assert (await reg.network_config()).backend_type == "udp"
        await updates.aclose()
        await reg.close()

    run(main())
    assert len(messages(caplog, "Backend.Type changed in etcd from udp to vxlan")) == 1


def test_etcd_down_at_start_retries_with_a_clear_line(etcd, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    etcd.stop()

    async def main() -> None:
        reg = registry(etcd.endpoint)
        task = asyncio.create_task(reg.network_config())
        await asyncio.sleep(1.5)
        assert not task.done()
        lines = messages(caplog, f"etcd at {etcd.endpoint} unreachable")
        assert len(lines) == 1 and "retrying in" in lines[0], lines
        await asyncio.to_thread(etcd.start)
        await put_config(etcd)
        await asyncio.wait_for(task, 15)
        await reg.close()

    run(main())
    assert messages(caplog, "reachable again")


def test_endpoints_are_tried_in_turn(etcd, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    dead = f"http://127.0.0.1:{free_port()}"

    async def main() -> None:
        await put_config(etcd)
        reg = registry(f"{dead},{etcd.endpoint}")
        loop = asyncio.get_running_loop()
        start = loop.time()
        await reg.network_config()
        lease = await reg.acquire(ip(1), "udp", None)
        assert loop.time() - start < 3  # no backoff: the second endpoint answered at once
        assert lease.subnet.subnet_of(IPv4Network("10.100.0.0/16"))
        await reg.close()

    run(main())
    assert not messages(caplog, "unreachable")


# --- acquisition ------------------------------------------------------------------


def test_two_concurrent_acquisitions_differ(etcd):
    async def main() -> None:
        await put_config(etcd, {"Network": "10.100.0.0/16", "SubnetMin": "10.100.1.0",
                                "SubnetMax": "10.100.2.0"})
        regs = [registry(etcd.endpoint) for _ in range(2)]
        leases = await asyncio.gather(*(r.acquire(ip(i + 1), "udp", None) for i, r in enumerate(regs)))
        assert {str(lease.subnet) for lease in leases} == {"10.100.1.0/24", "10.100.2.0/24"}
        assert await truth(etcd) == {str(lease.subnet): str(lease.public_ip) for lease in leases}
        for r in regs:
            await r.close()

    run(main())


def test_twenty_concurrent_acquisitions_never_share(etcd):
    async def main() -> None:
        # 24 subnets for 20 hosts: random choices collide, and only the transactions keep them apart.
        await put_config(etcd, {"Network": "10.7.0.0/16", "SubnetMin": "10.7.1.0", "SubnetMax": "10.7.24.0"})
        regs = [registry(etcd.endpoint, rng=random.Random(i % 3)) for i in range(20)]
        leases = await asyncio.gather(*(r.acquire(ip(i + 1), "udp", None) for i, r in enumerate(regs)))
        subnets = [lease.subnet for lease in leases]
        assert len(set(subnets)) == 20
        held = await truth(etcd)
        assert held == {str(lease.subnet): str(lease.public_ip) for lease in leases}
        for r in regs:
            await r.close()

    run(main(), 60)


def test_restart_reuses_the_subnet_with_a_fresh_lease(etcd):
    async def main() -> None:
        await put_config(etcd)
        first = registry(etcd.endpoint)
        lease = await first.acquire(ip(1), "udp", None)
        old_id = first.keeper.etcd_lease
        await first.close()
        # Someone else joins meanwhile; the restarted host must still get its own subnet back.
        other = registry(etcd.endpoint)
        await other.acquire(ip(2), "udp", None)
        again = registry(etcd.endpoint)
        relet = await again.acquire(ip(1), "vxlan", {"VtepMAC": "aa:bb:cc:dd:ee:ff"})
        assert relet.subnet == lease.subnet
        assert again.keeper.etcd_lease not in (0, old_id)
        async with admin(etcd) as client:
            kv = await client.get(key(str(lease.subnet)))
            assert kv.lease == again.keeper.etcd_lease
            assert json.loads(kv.value)["BackendData"] == {"VtepMAC": "aa:bb:cc:dd:ee:ff"}
        await other.close()
        await again.close()

    run(main())


def test_previous_subnet_file_is_honoured(etcd, tmp_path: Path):
    env = tmp_path / "subnet.env"
    env.write_text("FLANNEL_NETWORK=10.100.0.0/16\nFLANNEL_SUBNET=10.100.77.1/24\nFLANNEL_MTU=1472\n")

    async def main() -> None:
        await put_config(etcd)
        reg = registry(etcd.endpoint, subnet_file=env)
        lease = await reg.acquire(ip(1), "udp", None)
        assert str(lease.subnet) == "10.100.77.0/24"
        # Held by another host now: the file is only a preference.
        thief = registry(etcd.endpoint, subnet_file=env)
        other = await thief.acquire(ip(2), "udp", None)
        assert other.subnet != lease.subnet
        await reg.close()
        await thief.close()

    run(main())


def test_reservations_are_never_taken_and_a_full_range_is_a_clear_error(etcd):
    async def main() -> None:
        await put_config(etcd, {"Network": "10.100.0.0/16", "SubnetMin": "10.100.1.0",
                                "SubnetMax": "10.100.4.0"})
        async with admin(etcd) as client:
            await client.put(key("10.100.1.0/24"), value("198.51.100.1"))
            await client.put(key("10.100.3.0/24"), value("198.51.100.3"))
        regs = [registry(etcd.endpoint) for _ in range(3)]
        got = await asyncio.gather(*(regs[i].acquire(ip(i + 1), "udp", None) for i in range(2)))
        assert {str(lease.subnet) for lease in got} == {"10.100.2.0/24", "10.100.4.0/24"}
        with pytest.raises(ConfigError, match=r"no free subnet in 10.100.0.0/16.*10.100.1.0 to .*10.100.4.0"):
            await regs[2].acquire(ip(3), "udp", None)
        held = await truth(etcd)
        assert held["10.100.1.0/24"] == "198.51.100.1" and held["10.100.3.0/24"] == "198.51.100.3"
        for r in regs:
            await r.close()

    run(main())


def test_a_reservation_naming_us_is_ours_without_a_lease(etcd):
    async def main() -> None:
        await put_config(etcd)
        async with admin(etcd) as client:
            await client.put(key("10.100.42.0/24"), value(ip(5)))
        reg = registry(etcd.endpoint)
        lease = await reg.acquire(ip(5), "udp", None)
        assert str(lease.subnet) == "10.100.42.0/24"
        assert reg.keeper.etcd_lease == 0
        async with admin(etcd) as client:
            kv = await client.get(key("10.100.42.0/24"))
            assert kv.lease == 0
        await reg.close()

    run(main())


def test_a_lease_is_renewed_before_it_expires(etcd):
    async def main() -> None:
        await put_config(etcd)
        reg = registry(etcd.endpoint, ttl=2, margin=1)
        lease = await reg.acquire(ip(1), "udp", None)
        await asyncio.sleep(5)  # two and a half TTLs
        assert (await truth(etcd)).get(str(lease.subnet)) == "192.0.2.1"
        await reg.close()

    run(main())


def test_renewal_is_retried_through_a_disconnect(etcd, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def main() -> None:
        await put_config(etcd)
        proxy = await TcpProxy(etcd.port).start()
        reg = registry(proxy.endpoint, ttl=8, margin=6)  # renews every 2 s
        lease = await reg.acquire(ip(1), "udp", None)
        lease_id = reg.keeper.etcd_lease
        proxy.cut()
        await asyncio.sleep(3.5)  # a renewal falls due and fails
        assert messages(caplog, "unreachable")
        proxy.restore()
        await asyncio.sleep(4)
        assert (await truth(etcd)).get(str(lease.subnet)) == "192.0.2.1"
        async with admin(etcd) as client:
            kv = await client.get(key(str(lease.subnet)))
            assert kv.lease == lease_id == reg.keeper.etcd_lease  # kept alive, never re-acquired
        await reg.close()
        await proxy.close()

    run(main())
    assert messages(caplog, "reachable again")


def test_our_lease_that_no_longer_fits_is_replaced(etcd):
    async def main() -> None:
        await put_config(etcd, {"Network": "10.100.0.0/16", "SubnetMax": "10.100.100.0"})
        async with admin(etcd) as client:
            old = await client.lease(60)
            await client.put(key("10.100.250.0/24"), value(ip(1)), lease=old)
        reg = registry(etcd.endpoint)
        lease = await reg.acquire(ip(1), "udp", None)
        assert lease.subnet.network_address <= IPv4Address("10.100.100.0")
        assert await truth(etcd) == {str(lease.subnet): "192.0.2.1"}
        await reg.close()

    run(main())


def test_an_oversized_renew_margin_is_clamped_and_said(caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    reg = registry("http://127.0.0.1:1", ttl=10, margin=20)
    assert reg.renew_margin == 5
    assert messages(caplog, "renew margin 20s is not below the lease TTL 10s")


# --- our own lease lost ----------------------------------------------------------------


def test_a_deleted_own_key_is_acquired_again(etcd, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def main() -> None:
        await put_config(etcd)
        reg = registry(etcd.endpoint)
        lease = await reg.acquire(ip(1), "udp", None)
        follower = Follower(reg)
        assert isinstance(await follower.next(), Snapshot)
        async with admin(etcd) as client:
            await client.delete(key(str(lease.subnet)))
        update = await follower.until(lambda u: isinstance(u, OwnLease))
        assert update.lease.subnet == lease.subnet  # it was free, so the same one
        assert (await truth(etcd)).get(str(lease.subnet)) == "192.0.2.1"

        # Taken over by another host: we move elsewhere, and leave theirs alone.
        async with admin(etcd) as client:
            await client.put(key(str(lease.subnet)), value(ip(9)))
        update = await follower.until(lambda u: isinstance(u, OwnLease))
        assert update.lease.subnet != lease.subnet
        held = await truth(etcd)
        assert held[str(lease.subnet)] == "192.0.2.9" and held[str(update.lease.subnet)] == "192.0.2.1"
        await follower.stop()
        await reg.close()

    run(main())
    assert messages(caplog, "was deleted from etcd; acquiring a subnet again")


def test_an_expired_own_lease_is_acquired_again(etcd, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def main() -> None:
        await put_config(etcd)
        reg = registry(etcd.endpoint, ttl=4, margin=3)
        lease = await reg.acquire(ip(1), "udp", None)
        old_id = reg.keeper.etcd_lease
        async with admin(etcd) as client:
            await client.revoke_lease(old_id)  # as if it had run out
        # No updates() consumer: the keeper alone notices, at its next renewal.
        update = await asyncio.wait_for(reg._updates.get(), 5)
        assert isinstance(update, OwnLease) and update.lease.subnet == lease.subnet
        assert reg.keeper.etcd_lease not in (0, old_id)
        assert (await truth(etcd)).get(str(lease.subnet)) == "192.0.2.1"
        await reg.close()

    run(main())
    assert messages(caplog, "expired in etcd; acquiring a subnet again")


def test_an_expired_peer_disappears(etcd):
    async def main() -> None:
        await put_config(etcd)
        short = registry(etcd.endpoint, ttl=2, margin=1)
        peer = await short.acquire(ip(1), "udp", None)
        watcher = registry(etcd.endpoint)
        mine = await watcher.acquire(ip(2), "udp", None)
        follower = Follower(watcher, mine.subnet)
        await follower.table_until(lambda t: peer.subnet in t)
        await short.close()  # no more renewals; the key goes when the lease runs out
        loop = asyncio.get_running_loop()
        start = loop.time()
        update = await follower.until(
            lambda u: isinstance(u, Changes)
            and any(isinstance(e, LeaseRemoved) and e.subnet == peer.subnet for e in u.events),
            timeout=10,
        )
        assert update and loop.time() - start < 8
        assert peer.subnet not in follower.watcher.leases
        await follower.stop()
        await watcher.close()

    run(main())


# --- the watch: resume, compaction, outage ----------------------------------------------


def test_a_watch_resumes_after_a_disconnect_without_relisting(etcd):
    async def main() -> None:
        await put_config(etcd)
        proxy = await TcpProxy(etcd.port).start()
        reg = registry(proxy.endpoint)
        follower = Follower(reg)
        assert isinstance(await follower.next(), Snapshot)
        proxy.cut()
        await asyncio.sleep(0.3)
        async with admin(etcd) as client:
            await client.put(key("10.100.5.0/24"), value(ip(5)))
            await client.put(key("10.100.6.0/24"), value(ip(6)))
            await client.delete(key("10.100.5.0/24"))
        proxy.restore()
        await follower.table_until(lambda t: table(t) == {"10.100.6.0/24": "192.0.2.6"})
        assert sum(isinstance(u, Snapshot) for u in follower.seen) == 1
        added = [e.subnet for u in follower.seen if isinstance(u, Changes) for e in u.events
                 if isinstance(e, LeaseAdded)]
        assert IPv4Network("10.100.5.0/24") in added  # replayed from history, not relisted
        await follower.stop()
        await reg.close()
        await proxy.close()

    run(main())


def test_a_compaction_while_disconnected_is_survived(etcd, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def main() -> None:
        await put_config(etcd)
        async with admin(etcd) as client:
            await client.put(key("10.100.1.0/24"), value(ip(1)))
            await client.put(key("10.100.2.0/24"), value(ip(2)))
        proxy = await TcpProxy(etcd.port).start()
        reg = registry(proxy.endpoint)
        follower = Follower(reg)
        assert isinstance(await follower.next(), Snapshot)
        assert table(follower.watcher.leases) == {"10.100.1.0/24": "192.0.2.1", "10.100.2.0/24": "192.0.2.2"}
        proxy.cut()
        await asyncio.sleep(0.3)
        async with admin(etcd) as client:
            await client.delete(key("10.100.1.0/24"))
            await client.put(key("10.100.2.0/24"), value(ip(22)))
            done = await client.put(key("10.100.3.0/24"), value(ip(3)))
        etcd.etcdctl("compaction", str(done.header.revision))
        proxy.restore()
        want = await truth(etcd)
        await follower.table_until(lambda t: table(t) == want, timeout=15)
        assert sum(isinstance(u, Snapshot) for u in follower.seen) == 2
        # The watch goes on from the new listing.
        async with admin(etcd) as client:
            await client.put(key("10.100.4.0/24"), value(ip(4)))
        await follower.table_until(lambda t: "10.100.4.0/24" in table(t))
        assert table(follower.watcher.leases) == await truth(etcd)
        await follower.stop()
        await reg.close()
        await proxy.close()

    run(main())
    assert messages(caplog, "missed history compacted")


def test_an_etcd_outage_is_survived(etcd, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def main() -> None:
        await put_config(etcd)
        peer = registry(etcd.endpoint)
        first = await peer.acquire(ip(1), "udp", None)
        reg = registry(etcd.endpoint)
        mine = await reg.acquire(ip(2), "udp", None)
        follower = Follower(reg, mine.subnet)
        await follower.table_until(lambda t: first.subnet in t)
        await asyncio.to_thread(etcd.stop)
        with pytest.raises(TimeoutError):
            await follower.next(timeout=10)  # nothing happens, nothing breaks
        assert messages(caplog, "unreachable")
        await asyncio.to_thread(etcd.start)
        late = registry(etcd.endpoint)
        later = await late.acquire(ip(3), "udp", None)
        await follower.table_until(lambda t: later.subnet in t, timeout=20)
        want = {str(first.subnet): "192.0.2.1", str(later.subnet): "192.0.2.3"}
        assert table(follower.watcher.leases) == want
        assert reg.own_lease is not None and reg.own_lease.subnet == mine.subnet
        assert not any(isinstance(u, OwnLease) for u in follower.seen)
        await follower.stop()
        for r in (peer, reg, late):
            await r.close()

    run(main(), 60)
    assert messages(caplog, "reachable again")


def test_a_corrupt_lease_is_logged_once_and_ignored(etcd, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def main() -> None:
        await put_config(etcd)
        async with admin(etcd) as client:
            await client.put(key("10.100.8.0/24"), b"{garbage")
            await client.put(key("10.100.9.0/24"), value(ip(9)))
            await client.put(f"{PREFIX}/subnets/not-a-subnet".encode(), value(ip(7)))
        reg = registry(etcd.endpoint)
        lease = await reg.acquire(ip(1), "udp", None)
        assert str(lease.subnet) != "10.100.8.0/24"
        follower = Follower(reg, lease.subnet)
        snap = await follower.next()
        assert isinstance(snap, Snapshot)
        assert {str(x.subnet) for x in snap.leases} == {"10.100.9.0/24", str(lease.subnet)}
        async with admin(etcd) as client:
            await client.put(key("10.100.8.0/24"), b"{garbage")  # the same bad value again
            await client.put(key("10.100.9.0/24"), b'{"PublicIP": "nope"}')  # a good lease goes bad
            await client.put(key("10.100.10.0/24"), value(ip(10)))
        await follower.table_until(lambda t: "10.100.10.0/24" in table(t))
        assert table(follower.watcher.leases) == {"10.100.10.0/24": "192.0.2.10"}
        await follower.stop()
        await reg.close()

    run(main())
    assert len(messages(caplog, "10.100.8.0-24")) == 1
    assert len(messages(caplog, "10.100.9.0-24")) == 1
    assert len(messages(caplog, "not-a-subnet")) == 1


# --- tunproxy leases -------------------------------------------------------------


def test_list_leases_and_the_table(etcd, capsys):
    from tunproxy import cli

    async def main() -> tuple[Lease, list[dict[str, Any]]]:
        await put_config(etcd, {"Network": "10.100.0.0/16", "SubnetMax": "10.100.199.0"})
        async with admin(etcd) as client:
            await client.put(key("10.100.200.0/24"), value("198.51.100.200", "vxlan"))
            await client.put(key("10.100.201.0/24"), b"{garbage")
        reg = registry(etcd.endpoint, ttl=600, margin=60)
        lease = await reg.acquire(ip(1), "udp", {"Port": 8285})
        await reg.close()
        return lease, await list_leases(EtcdSettings.create(etcd.endpoint, PREFIX))

    lease, rows = run(main())
    assert [r["subnet"] for r in rows] == [str(lease.subnet), "10.100.200.0/24"]  # sorted, garbage left out
    ours, reserved = rows
    assert ours["public_ip"] == "192.0.2.1" and ours["backend_data"] == {"Port": 8285}
    assert 590 <= ours["ttl_left"] <= 600
    assert reserved == {"subnet": "10.100.200.0/24", "public_ip": "198.51.100.200", "backend_type": "vxlan",
                        "backend_data": None, "ttl_left": None}
    text = format_leases(rows).splitlines()
    assert text[0].split() == ["SUBNET", "PUBLIC-IP", "BACKEND", "EXPIRES-IN"]
    minutes, seconds = divmod(ours["ttl_left"], 60)
    assert text[1].split() == [ours["subnet"], "192.0.2.1", "udp", f"{minutes}m{seconds:02d}s"]
    assert text[2].split() == ["10.100.200.0/24", "198.51.100.200", "vxlan", "never", "(reserved)"]

    assert cli.main(["leases", "--etcd-endpoints", etcd.endpoint, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["subnet"] for r in printed] == [r["subnet"] for r in rows]
    assert cli.main(["leases", "--etcd-endpoints", etcd.endpoint]) == 0
    assert "10.100.200.0/24" in capsys.readouterr().out


def test_list_leases_with_etcd_down_is_one_clear_error(capsys):
    from tunproxy import cli

    dead = f"http://127.0.0.1:{free_port()}"
    assert cli.main(["leases", "--etcd-endpoints", dead]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tunproxy: error: etcd unreachable") and dead in err and "Traceback" not in err


# --- leases we stop using are revoked (issue 8, fault 4) ---------------------------


async def etcd_leases(etcd) -> set[int]:  # type: ignore[no-untyped-def]
    """The IDs of every lease etcd holds."""
    async with admin(etcd) as client:
        reply = await client.leasestub.LeaseLeases(aetcd.rpc.LeaseLeasesRequest(), timeout=5)
        return {item.ID for item in reply.leases}


def test_ten_restarts_leave_one_etcd_lease_per_live_host(etcd, tmp_path: Path):
    """Each restart used to grant a new lease and leave the old one behind for its whole TTL."""

    async def main() -> None:
        await put_config(etcd)
        subnets: dict[int, set[IPv4Network]] = {1: set(), 2: set()}
        for _ in range(10):
            for host in (1, 2):
                reg = registry(etcd.endpoint, ttl=600, subnet_file=tmp_path / f"h{host}.env")
                lease = await reg.acquire(ip(host), "udp", None)
                subnets[host].add(lease.subnet)
                (tmp_path / f"h{host}.env").write_text(f"FLANNEL_SUBNET={lease.subnet}\n")
                await reg.close()  # a clean exit keeps the key, as flannel does
        assert all(len(held) == 1 for held in subnets.values()), subnets
        async with admin(etcd) as client:
            attached = {kv.lease for kv in await client.get_prefix(f"{PREFIX}/subnets/".encode())}
        assert len(attached) == 2 and 0 not in attached
        assert await etcd_leases(etcd) == attached

    run(main(), timeout=60)


def test_a_lease_left_by_a_reacquire_is_revoked(etcd, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def main() -> None:
        await put_config(etcd)
        reg = registry(etcd.endpoint)
        lease = await reg.acquire(ip(1), "udp", None)
        old_id = reg.keeper.etcd_lease
        follower = Follower(reg)
        assert isinstance(await follower.next(), Snapshot)
        async with admin(etcd) as client:
            await client.delete(key(str(lease.subnet)))  # our key goes; its etcd lease would stay
        await follower.until(lambda u: isinstance(u, OwnLease))
        await wait_for_log(caplog, f"revoked etcd lease {old_id:x}")
        assert await etcd_leases(etcd) == {reg.keeper.etcd_lease}
        await follower.stop()
        await reg.close()

    run(main())


# --- the watch outlives failures of other calls (issue 8, fault 1) ------------------


def test_the_watch_survives_its_channel_being_closed_by_another_call(etcd, caplog):
    """A failed call drops the shared connection; the watch call is cancelled under it and must resume."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)

    async def main() -> None:
        await put_config(etcd)
        reg = registry(etcd.endpoint)
        await reg.acquire(ip(1), "udp", None)
        follower = Follower(reg)
        assert isinstance(await follower.next(), Snapshot)
        await asyncio.sleep(0.2)  # the watch is established
        # What a timed-out config check does: drop the client everyone shares.
        await reg._conn.failed(await reg._conn.client())
        async with admin(etcd) as client:
            await client.put(key("10.100.99.0/24"), value(ip(7)))
        await follower.table_until(lambda t: IPv4Network("10.100.99.0/24") in t, timeout=15)
        assert not follower.task.done()
        await follower.stop()
        await reg.close()

    run(main())


def test_a_quiet_watch_is_checked_with_a_progress_request(etcd, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)

    async def main() -> None:
        await put_config(etcd)
        reg = registry(etcd.endpoint)
        reg.watch_idle = 0.5
        await reg.acquire(ip(1), "udp", None)
        follower = Follower(reg)
        assert isinstance(await follower.next(), Snapshot)
        await wait_for_log(caplog, "asking etcd for progress", timeout=5)
        await asyncio.sleep(1.5)  # a live etcd answers each request: the watch is not restarted
        assert not messages(caplog, "did not answer a progress request")
        async with admin(etcd) as client:
            await client.put(key("10.100.98.0/24"), value(ip(8)))
        await follower.table_until(lambda t: IPv4Network("10.100.98.0/24") in t)
        await follower.stop()
        await reg.close()

    run(main())


def test_a_background_task_that_dies_ends_updates_with_one_line(etcd):
    from tunproxy.supervise import TaskDied

    async def main() -> None:
        await put_config(etcd)
        reg = registry(etcd.endpoint)
        await reg.acquire(ip(1), "udp", None)
        updates = reg.updates()
        assert isinstance(await anext(updates), Snapshot)
        assert reg._keep_task is not None
        reg._keep_task.cancel()  # as if it had ended by itself
        with pytest.raises(TaskDied, match="etcd-lease-keeper stopped"):
            await asyncio.wait_for(anext(updates), 5)
        await updates.aclose()
        await reg.close()

    run(main())


def test_a_revoked_lease_with_600_keys_arrives_in_chunks(etcd):
    """One watch response with 600 deletions is decoded and handed over in chunks of at most
    DECODE_CHUNK, with the event loop turning between them (the data path runs meanwhile)."""
    from tunproxy.etcd.watch_loop import DECODE_CHUNK

    async def main() -> None:
        await put_config(etcd, {"Network": "10.100.0.0/16", "SubnetLen": 28, "Backend": {"Type": "udp"}})
        subnets = list(IPv4Network("10.100.0.0/16").subnets(new_prefix=28))[1:601]
        async with admin(etcd) as client:
            grant = await client.lease(600)
            t = client.transactions
            for start in range(0, 600, 100):
                batch = subnets[start : start + 100]
                puts = [t.put(key(str(s)), value(ip(7)), lease=grant.id) for s in batch]
                await client.transaction(compare=[], success=puts, failure=[])
        reg = registry(etcd.endpoint)
        await reg.acquire(ip(1), "udp", None)  # a subnet the 600 left free
        follower = Follower(reg)
        await follower.table_until(lambda table: len(table) == 601)  # and our own
        turns = 0

        async def count_turns() -> None:
            nonlocal turns
            while True:
                await asyncio.sleep(0)
                turns += 1

        counter = asyncio.create_task(count_turns())
        async with admin(etcd) as client:
            await client.revoke_lease(grant.id)
        sizes = []
        while sum(sizes) < 600:
            update = await follower.next()
            if isinstance(update, Changes):
                sizes.append(len(update.events))
        counter.cancel()
        assert len(sizes) >= 600 // DECODE_CHUNK and max(sizes) <= DECODE_CHUNK, sizes
        assert turns >= len(sizes)
        assert len(follower.watcher.leases) == 1
        await follower.stop()
        await reg.close()

    run(main())
