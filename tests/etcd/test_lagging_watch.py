"""Compaction while a live watch lags behind (not while it is disconnected).

The registry's connection stays open, but a proxy holds back what etcd sends
(and stops reading from etcd), so etcd's send buffers fill and the watch falls
behind: etcd parks it as unsynced. Hundreds of revisions are written, history
is compacted at the current revision after each one while the watch is behind,
and the proxy lets go. etcd either tells the watch the history it still owes was
compacted (the registry lists once and goes on from there), or had already pulled
the backlog into memory for it (etcd 3.5 does, so far: no relist); either way no
change is missed and there is one relist at most.

Found by it: etcd sends the backlog as one watch response of tens of MB, and
gRPC's default 4 MiB receive limit failed the watch on every retry, for good.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from tunproxy.peers.base import Changes, Snapshot

from .proxy import TcpProxy
from .test_registry import LOGGER, Follower, admin, ip, key, messages, put_config, registry, run, table, truth

pytestmark = pytest.mark.etcd

KEYS = [f"10.100.{i}.0/24" for i in range(1, 201)]
REVISIONS = 200  # transactions, each rewriting 100 keys: 20,000 events, ~20 MB of watch responses


def _value(n: int) -> bytes:
    # A little padding: the responses must outgrow every buffer between etcd and the registry.
    doc = {"PublicIP": str(ip(n % 250 + 1)), "BackendType": "udp", "BackendData": {"pad": "x" * 1000}}
    return json.dumps(doc).encode()


async def _revision(client) -> int:  # type: ignore[no-untyped-def]
    """etcd's current revision: a put outside the watched prefix says it."""
    return int((await client.put(b"/tunproxy-test/marker", b"x")).header.revision)


@pytest.mark.parametrize("compact", [True, False], ids=["compacted", "not-compacted"])
def test_a_lagging_watch_misses_nothing_and_relists_at_most_once(etcd, caplog, compact):
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def main() -> None:
        await put_config(etcd)
        proxy = await TcpProxy(etcd.port).start()
        reg = registry(proxy.endpoint)
        follower = Follower(reg)
        assert isinstance(await follower.next(), Snapshot)
        async with admin(etcd) as client:
            await client.put(key(KEYS[0]), _value(0))
        await follower.table_until(lambda t: KEYS[0] in table(t))  # the watch is live and current
        proxy.pause()
        async with admin(etcd) as client:
            t = client.transactions
            for revision in range(REVISIONS):
                start = revision % 2 * 100
                ops = [t.put(key(k), _value(revision + i)) for i, k in enumerate(KEYS[start : start + 100])]
                await client.transaction(compare=[], success=ops, failure=[])
                if compact:
                    # At the revision just written, before etcd's sync loop (every 100 ms) has
                    # pulled it for the lagging watch: a compaction the watch is behind.
                    await client.compact(await _revision(client))
        status = json.loads(etcd.etcdctl("endpoint", "status", "-w", "json").stdout)
        last = int(status[0]["Status"]["header"]["revision"])
        await asyncio.sleep(0.5)
        assert follower.queue.empty(), "the watch was not held back"  # it is behind by every revision
        proxy.resume()
        want = await truth(etcd)
        await follower.table_until(lambda t: table(t) == want, timeout=90)
        relists = sum(isinstance(u, Snapshot) for u in follower.seen) - 1
        assert relists <= 1, relists
        events = sum(len(u.events) for u in follower.seen if isinstance(u, Changes))
        print(f"compact={compact}: {relists} relist(s), {events} lease events, etcd at revision {last}")
        if relists:
            assert messages(caplog, "missed history compacted")
        # The watch goes on after it.
        async with admin(etcd) as client:
            await client.put(key("10.100.250.0/24"), _value(7))
        await follower.table_until(lambda t: "10.100.250.0/24" in table(t))
        assert table(follower.watcher.leases) == await truth(etcd)
        await follower.stop()
        await reg.close()
        await proxy.close()

    run(main(), timeout=180)
