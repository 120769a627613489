"""Leases in etcd v3, flannel's layout: ``EtcdRegistry``, the thin asyncio adapter.

How it works. ``<prefix>/config`` holds the network config; each host's
lease is ``<prefix>/subnets/10.100.5.0-24`` with flannel's JSON value,
attached to an etcd lease with the TTL. A key with no etcd lease is a
reservation: never taken by another host, used as is by the host it names.

* ``network_config()`` waits (with backoff, one log line per distinct
  problem) until etcd answers and the config is valid.
* ``acquire()`` lists the subnets, lets ``acquire.plan_acquisition`` choose,
  and writes with a transaction conditioned on the key's revision (or on its
  absence), so concurrent hosts never share a subnet; a lost race lists again.
  A task then runs the ``keeper.Keeper``: it asks when to renew, verify our
  key, re-acquire (yielding ``OwnLease``) or revoke leases we left, and this
  module makes those calls and hands back the answers with the time.
* ``updates()`` runs a ``watch_loop.WatchLoop``: a listing (a ``Snapshot``), then
  a watch from the listing's revision+1, one ``Changes`` per response; after a
  compaction or a store that went backwards, a new ``Snapshot``, which the
  daemon's LeaseWatcher diffs.

While etcd is unreachable nothing fails: calls retry with backoff (0.5 s
to 10 s), trying the endpoints in turn, and ``updates()`` simply yields
nothing, so the daemon keeps forwarding with the table it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from ..logonce import REPEAT_EVERY, Said
from ..model import ConfigError, Lease, NetworkConfig, subnet_key
from ..peers.base import OwnLease, Registry, Update
from ..subnetenv import read_previous_subnet
from ..supervise import TaskDied
from .acquire import Entry, Plan, PlanKind, config_drift, plan_acquisition, race_delay
from .connection import RETRYABLE, Client, Connection, EtcdSettings, describe, guarded, settle
from .cursor import WATCH_IDLE
from .keep_loop import KeepLoop, LeaseStore
from .keeper import (
    DEFAULT_RENEW_MARGIN,
    DEFAULT_TTL,
    Held,
    Keeper,
    RevokeVerdict,
    Stored,
    revoke_verdict,
)
from .retry import Backoff
from .values import LeaseDecoder, entry_from
from .watch_loop import WatchLoop

__all__ = ["EtcdRegistry"]

log = logging.getLogger(__name__)

SHUTDOWN_WAIT = 2.0  # seconds a background task gets to end once cancelled


class EtcdRegistry(Registry):
    """Leases and the network config in etcd v3, flannel's layout (see the module docstring).

    ``clock`` is the monotonic clock the keeper is fed with (seconds).
    """

    def __init__(
        self,
        settings: EtcdSettings,
        subnet_file: Path | None = None,
        ttl: float = DEFAULT_TTL,
        renew_margin: float = DEFAULT_RENEW_MARGIN,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.subnet_file = subnet_file
        self.keeper = Keeper(ttl, renew_margin)
        if self.keeper.warning:
            log.warning("%s", self.keeper.warning)
        self.ttl = self.keeper.ttl
        self.renew_margin = self.keeper.renew_margin
        self.config_key = f"{settings.prefix}/config".encode()
        self.subnets_key = f"{settings.prefix}/subnets/".encode()
        self._conn = Connection(settings)
        self._rng = rng or random.Random()
        self._clock = clock
        self._config: NetworkConfig | None = None
        self._desired: Lease | None = None
        self._updates: asyncio.Queue[Update] = asyncio.Queue()
        self._wake = asyncio.Event()  # the watch saw something happen to our key
        self._keep_task: asyncio.Task[None] | None = None
        self._watchers: set[asyncio.Task[None]] = set()
        self._decoder = LeaseDecoder()
        self._watch: WatchLoop | None = None
        store = LeaseStore(
            refresh=self._refresh,
            read=self._read_own,
            reacquire=self._acquire,
            revoke=self._revoke,
            wait=self._wait,
            report=lambda lease: self._updates.put_nowait(OwnLease(lease)),
        )
        self._keeping = KeepLoop(self.keeper, store, clock, retryable=RETRYABLE)
        self.config_poll = 10.0  # seconds between looks at the config, for drift only
        self.watch_idle = WATCH_IDLE  # seconds of watch silence before asking etcd for progress

    # --- what the daemon calls ----------------------------------------------

    @property
    def own_lease(self) -> Lease | None:
        """Our current lease (None before acquire)."""
        return self.keeper.lease

    @property
    def lease_problem(self) -> str | None:
        """Set while our lease is lost and being re-acquired."""
        return self.keeper.problem

    def describe(self) -> dict[str, Any]:
        """``kind`` etcd, its ``endpoints``, whether it is ``reachable`` and the ``watch_revision``."""
        return {
            "kind": "etcd",
            "endpoints": self.settings.urls(),
            "reachable": bool(self.reachable),
            "watch_revision": self.watch_revision,
        }

    def lease_expiry(self) -> float | None:
        """From the keeper's deadline, which follows the TTL etcd granted."""
        left = self.keeper.remaining(self._clock())
        return None if left is None else time.time() + left

    @property
    def reachable(self) -> bool:
        """False from a failed call (after the endpoints were all tried) until the next one succeeds."""
        return not self._conn.down

    @property
    def watch_revision(self) -> int | None:
        """The etcd revision the watch has applied up to; None before the first listing."""
        return self._watch.cursor.revision if self._watch and self._watch.cursor.revision else None

    async def network_config(self) -> NetworkConfig:
        """The network config from ``<prefix>/config``; waits (one line per problem) until it is usable."""
        if self._config is not None:
            return self._config
        backoff = Backoff(cap=5.0)  # one cheap read; notice a fix soon
        said = Said()
        key = self.config_key.decode()
        while True:
            kv = await self._conn.call(lambda c: c.get(self.config_key))
            if kv is None:
                problem = f"no network config at {key} in etcd ({self.settings.urls()}); waiting for one"
            else:
                try:
                    config = NetworkConfig.parse(kv.value)
                except ConfigError as e:
                    problem = f"network config at {key} is unusable: {e}; waiting for a fix"
                else:
                    if "config" in said:
                        log.info("network config at %s is now usable", key)
                    log.info(
                        "network %s, subnets /%d from %s to %s, backend %s",
                        config.network,
                        config.subnet_len,
                        config.subnet_min,
                        config.subnet_max,
                        config.backend_type,
                    )
                    self._config = config
                    return config
            if said.due("config", problem):
                log.error("%s", problem)
            await asyncio.sleep(backoff.next())

    async def acquire(self, public_ip: IPv4Address, backend_type: str, backend_data: Any) -> Lease:
        """Takes a subnet as flannel's tryAcquireLease (etcd.acquire) and starts the keeper that renews it.

        ConfigError when no subnet is free; retries etcd until it answers.
        """
        config = await self.network_config()
        self._desired = Lease(config.network, public_ip, backend_type, backend_data)
        at, held = await self._acquire(read_previous_subnet(self.subnet_file))
        if self._keep_task is not None:
            self._keep_task.cancel()  # before the keeper changes under a call it has out
        self.keeper.acquired(at, held)
        due = self.keeper.revoke_due(self._clock())
        if due is not None:
            await self._keeping.revoke(due)
        self._keep_task = asyncio.create_task(self._keeping.run(), name="etcd-lease-keeper")
        return held.lease

    async def updates(self) -> AsyncIterator[Update]:
        """Peers' leases from a listing, then a watch, of ``<prefix>/subnets/``; OwnLease when ours moved.

        TaskDied if the watch, the config check or the keeper ends on its own.
        """
        config = await self.network_config()
        self._watch = WatchLoop(
            self._conn, self.subnets_key, config.network, self._decoder, self._updates,
            self.keeper, self._wake, self.watch_idle,
        )  # fmt: skip
        tasks = {
            asyncio.create_task(self._watch.run(), name="etcd-watch"),
            asyncio.create_task(self._config_loop(), name="etcd-config"),
        }
        self._watchers |= tasks
        try:
            while True:
                yield await self._next_update()
        finally:
            self._watchers -= tasks
            await settle(tasks, SHUTDOWN_WAIT)

    async def _next_update(self) -> Update:
        """The next update; ``TaskDied`` if the watch, config check or keeper ended on its own."""
        if not self._updates.empty():
            return self._updates.get_nowait()
        getter = asyncio.ensure_future(self._updates.get())
        background = {*self._watchers, *((self._keep_task,) if self._keep_task else ())}
        try:
            done, _ = await asyncio.wait({getter, *background}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            getter.cancel()
        if getter in done and not getter.cancelled():
            return getter.result()
        task = next(t for t in done if t is not getter)
        if task.cancelled():
            why = "it was cancelled"
        else:
            error = task.exception()
            why = describe(error) if error else "it returned"
        raise TaskDied(f"{task.get_name()} stopped: {why}")

    async def close(self) -> None:
        """Stop renewing and watching; the lease stays until it expires, so a restart keeps it."""
        tasks = {t for t in (self._keep_task, *self._watchers) if t is not None}
        self._keep_task = None
        await settle(tasks, SHUTDOWN_WAIT)
        await self._conn.close()

    def _own_key(self, subnet: IPv4Network) -> bytes:
        return self.subnets_key + subnet_key(subnet).encode()

    # --- acquiring ------------------------------------------------------------------

    async def _entries(self, client: Client) -> list[Entry]:
        resp = await client.get_prefix(self.subnets_key)
        entries = []
        for kv in resp.kvs:
            key = kv.key.decode(errors="replace")
            entry = entry_from(key, kv.value, kv.lease, kv.mod_revision)
            if entry is None or entry.lease is None:
                message = self._decoder.decode(key, kv.value)[1]
                if message:
                    log.warning("%s", message)
            if entry is None:
                continue
            entries.append(entry)
        return entries

    async def _acquire(self, previous: IPv4Network | None) -> tuple[float, Held]:
        """Take a subnet (see plan_acquisition): when, and what; ConfigError if none is free."""
        config, desired = self._config, self._desired
        assert config is not None and desired is not None
        races = 0
        while True:
            entries = await self._conn.call(self._entries)
            plan = plan_acquisition(config, entries, desired, previous, self._rng)
            for stale in plan.stale:
                log.info("deleting our old lease %s: it does not fit the network config", stale.subnet)
                await self._conn.call(functools.partial(self._delete_if_unchanged, entry=stale))
                self.keeper.unused(stale.etcd_lease)
            written = await self._conn.call(functools.partial(self._write, plan=plan, desired=desired))
            if written is not None:
                how = {
                    PlanKind.CREATE: "leased",
                    PlanKind.RENEW: "reusing our lease on",
                    PlanKind.RESERVED: "using the reservation for",
                }[plan.kind]
                log.info("%s %s for %s (%s)", how, plan.subnet, desired.public_ip, desired.backend_type)
                return written
            races += 1
            log.info("lost a race for %s; choosing again", plan.subnet)
            await asyncio.sleep(race_delay(races, self._rng))

    async def _delete_if_unchanged(self, client: Client, entry: Entry) -> None:
        t = client.transactions
        key = self._own_key(entry.subnet)
        await client.transaction(
            compare=[t.mod(key) == entry.mod_revision], success=[t.delete(key)], failure=[]
        )

    async def _write(self, client: Client, plan: Plan, desired: Lease) -> tuple[float, Held] | None:
        """Write the plan with a transaction; None if the key changed under us."""
        t = client.transactions
        key = self._own_key(plan.subnet)
        lease = dataclasses.replace(desired, subnet=plan.subnet)
        value = lease.to_json().encode()
        if plan.kind is PlanKind.RESERVED:
            if plan.write:
                ok, _ = await client.transaction(
                    compare=[t.mod(key) == plan.mod_revision], success=[t.put(key, value)], failure=[]
                )
                if not ok:
                    return None
            return self._clock(), Held(lease)
        grant = await client.lease(self.ttl)
        granted_at = self._clock()
        compare = t.create(key) == 0 if plan.kind is PlanKind.CREATE else t.mod(key) == plan.mod_revision
        ok, _ = await client.transaction(
            compare=[compare], success=[t.put(key, value, lease=grant.id)], failure=[]
        )
        if not ok:
            with contextlib.suppress(*RETRYABLE):
                await client.revoke_lease(grant.id)
            return None
        if plan.kind is PlanKind.RENEW and plan.replaces != grant.id:
            self.keeper.unused(plan.replaces)  # the key moved to the new lease; the old one would linger
        return granted_at, Held(lease, grant.id, grant.ttl)

    # --- keeping our lease: the keeper decides, keep_loop.KeepLoop runs these calls --------

    async def _refresh(self, etcd_lease: int) -> float:
        reply = await self._conn.call(lambda c: c.refresh_lease(etcd_lease))
        return getattr(reply, "TTL", 0) if reply is not None else 0

    async def _read_own(self, subnet: IPv4Network) -> Stored | None:
        kv = await self._conn.call(lambda c: c.get(self._own_key(subnet)))
        if kv is None:
            return None
        return Stored(self._decoder.decode(kv.key.decode(errors="replace"), kv.value)[0], kv.lease)

    async def _wait(self, until: float) -> None:
        """Until ``until`` (monotonic s), or until the watch sees something of our key."""
        delay = until - self._clock()
        with contextlib.suppress(TimeoutError):
            if math.isinf(delay):
                await self._wake.wait()
            elif delay > 0:
                await asyncio.wait_for(self._wake.wait(), delay)
        self._wake.clear()  # what the watch saw is in the keeper already; the next poll reads it

    async def _revoke(self, etcd_lease: int) -> None:
        """Revoke a lease we stopped using, unless it holds keys now: someone re-attached a
        key to it, and revoking it would delete that key."""
        client = await guarded(self._conn.client())
        info = await guarded(client.get_lease_info(etcd_lease, keys=True))
        verdict = revoke_verdict(info.TTL, len(info.keys))
        if verdict is RevokeVerdict.GONE:
            log.debug("etcd lease %x is already gone", etcd_lease)
        elif verdict is RevokeVerdict.HOLDS_KEYS:
            log.info("not revoking etcd lease %x: it holds %d key(s) now", etcd_lease, len(info.keys))
        else:
            await guarded(client.revoke_lease(etcd_lease))
            log.info("revoked etcd lease %x, which we no longer use", etcd_lease)

    # --- the config, for drift only ---------------------------------------------------

    async def _config_loop(self) -> None:
        """Re-read the config now and then, to say (once per change) that a change is not applied."""
        assert self._config is not None
        said = Said(repeat=REPEAT_EVERY)
        while True:
            await asyncio.sleep(self.config_poll)
            try:
                kv = await self._conn.call(lambda c: c.get(self.config_key))
            except Exception as e:  # never end the loop over one bad look
                if said.due("check", describe(e), time.monotonic()):
                    log.warning("checking the network config in etcd failed: %s", describe(e))
                continue
            said.forget("check")
            drift = config_drift(self._config, kv.value if kv is not None else None)
            if drift is None:
                said.forget("drift")
            elif said.due("drift", drift):
                log.error("%s", drift)
