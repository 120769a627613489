"""The keeper's loop: ``keeper.Keeper`` decides, this runs its actions on a ``LeaseStore``.

One loop for etcd (``EtcdRegistry`` is the store) and for the tests' in-memory
etcd, so the scenario run over both exercises the same code. Each round: say
what the keeper has to say, ask it what to do now, make that call on the
store, and hand the answer back with the time. A call that fails is the
keeper's ``failed`` (it backs off); a failure of a kind the store expects
(``retryable``: etcd unreachable) is a debug line, anything else a traceback
once a minute while it lasts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Network

from ..logonce import REPEAT_EVERY, Said
from ..model import ConfigError, Lease
from ..supervise import own_cancellation
from .keeper import Held, Keeper, Reacquire, Renew, Report, RevokeUnused, Stored, Verify, Wait

log = logging.getLogger("tunproxy.etcd.registry")


@dataclass(frozen=True)
class LeaseStore:
    """What the keeper's actions need of a store, as calls. Times are the keeper's clock
    (monotonic seconds).

    ``refresh(etcd_lease)``: keep it alive; the TTL it has now (0 or less: gone).
    ``read(subnet)``: our key for ``subnet`` now (None: there is none).
    ``reacquire(previous)``: take a subnet again, ``previous`` first if free; when the
    grant was made and what is held; ConfigError if no subnet is free.
    ``revoke(etcd_lease)``: revoke a lease we stopped using (if it is still right to).
    ``wait(until)``: return at ``until`` (math.inf: not by itself) or earlier, when
    something happened to our key. ``report(lease)``: our lease was taken again.
    """

    refresh: Callable[[int], Awaitable[float]]
    read: Callable[[IPv4Network], Awaitable[Stored | None]]
    reacquire: Callable[[IPv4Network | None], Awaitable[tuple[float, Held]]]
    revoke: Callable[[int], Awaitable[None]]
    wait: Callable[[float], Awaitable[None]]
    report: Callable[[Lease], None]


class KeepLoop:
    """``keeper``'s actions on ``store``, with ``clock`` the keeper's time; ``run`` never returns."""

    def __init__(
        self,
        keeper: Keeper,
        store: LeaseStore,
        clock: Callable[[], float],
        retryable: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.keeper, self.store, self.clock, self.retryable = keeper, store, clock, retryable
        self._failures = Said(repeat=REPEAT_EVERY)  # unexpected errors: the traceback once a minute

    async def run(self) -> None:
        """Run the keeper's actions until cancelled; never raises but CancelledError (and what
        ``store.wait`` raises, which a test uses to stop at a deadline)."""
        while True:
            for line in self.keeper.messages():
                log.log(line.level, "%s", line.text)
            action = self.keeper.poll(self.clock())
            if isinstance(action, Wait):
                await self.store.wait(action.until)
            elif isinstance(action, Report):
                self.store.report(action.lease)
            elif isinstance(action, RevokeUnused):
                await self.revoke(action)
            else:
                await self.step(action)

    async def step(self, action: Renew | Verify | Reacquire) -> None:
        """One call for ``action``; its answer (or its failure) goes to the keeper."""
        keeper, store = self.keeper, self.store
        try:
            if isinstance(action, Renew):
                keeper.renewed(self.clock(), await store.refresh(action.etcd_lease))
            elif isinstance(action, Verify):
                keeper.verified(self.clock(), await store.read(action.subnet))
            else:
                try:
                    at, held = await store.reacquire(action.previous)
                except ConfigError as e:
                    keeper.reacquire_failed(self.clock(), str(e))
                else:
                    keeper.reacquired(at, held)
        except asyncio.CancelledError:
            if own_cancellation():
                raise
            log.warning("keeping our lease: a call was cancelled; retrying")
            keeper.failed(self.clock())
        except Exception as e:
            self._failed("keeping our lease", e)
            keeper.failed(self.clock())

    async def revoke(self, action: RevokeUnused) -> None:
        """One try at revoking each lease in ``action``; after a failure the rest wait for the
        keeper's next try."""
        for etcd_lease in action.ids:
            try:
                await self.store.revoke(etcd_lease)
            except Exception as e:
                self._failed(f"revoking etcd lease {etcd_lease:x}", e)
                self.keeper.revoke_failed(self.clock())
                return
            self.keeper.revoked(etcd_lease)

    def _failed(self, what: str, error: Exception) -> None:
        if isinstance(error, self.retryable):
            log.debug("%s failed (%s); trying again later", what, error)
        elif self._failures.due(what, repr(error), self.clock()):
            log.exception("%s failed; trying again later", what)
