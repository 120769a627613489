"""The backend interface: how a lease becomes forwarding state on this host.

A backend is driven in this order, always from the event loop:

    await backend.open()               # devices exist; backend_data is known
    lease = registry.acquire(backend_data)
    await backend.set_subnet(subnet)   # our own address and the network route
    await backend.apply(removed, added)   # any number of times: a burst of lease changes
    await backend.reconcile()          # once, after the first snapshot: a killed run's leftovers go
    await backend.close()              # everything it added is gone

Netlink calls are blocking (pyroute2 cannot run on uvloop), so backends do
them with ``asyncio.to_thread``; see ``tunproxy.netlink``.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any, ClassVar

from ..backend_config import UdpFlags
from ..counters import Counters, Drop
from ..leftovers import Kept, sweep
from ..model import Lease, NetworkConfig
from ..netlink import Underlay, run_netlink

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendContext:
    """What a backend is built from: the config (its ``backend`` options typed), the underlay
    interface, the address peers send to, and the udp backend's command-line flags."""

    network: NetworkConfig
    underlay: Underlay
    public_ip: IPv4Address
    flags: UdpFlags = field(default_factory=UdpFlags)


class Backend(abc.ABC):
    """Turns leases into forwarding state on this host; driven in the order the module docstring gives.

    ``name`` is the backend's ``Backend.Type`` in the network config and
    ``BackendType`` in a lease (flannel's names: ``udp``, ``vxlan``, ``host-gw``).
    """

    name: ClassVar[str]

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx

    @property
    @abc.abstractmethod
    def mtu(self) -> int:
        """The MTU of the overlay as this backend sets it; goes to subnet.env."""

    @property
    def backend_data(self) -> Any:
        """What our lease advertises to peers in BackendData (None for udp and host-gw)."""
        return None

    @classmethod
    def static_backend_data(cls, public_ip: IPv4Address, config: NetworkConfig) -> Any:
        """A static peer's BackendData when its entry has none (vxlan derives its VtepMAC); else None."""
        return None

    @abc.abstractmethod
    async def open(self) -> None:
        """Create devices and sockets; idempotent against leftovers of a previous run."""

    @abc.abstractmethod
    async def set_subnet(self, subnet: IPv4Network) -> None:
        """Configure our own lease; may be called again if the lease is re-acquired."""

    @abc.abstractmethod
    async def add_peer(self, lease: Lease) -> None:
        """Route the peer's subnet to it. Raise PeerRefused for a peer this backend cannot reach."""

    @abc.abstractmethod
    async def remove_peer(self, lease: Lease) -> None:
        """Undo add_peer; a peer that was never added is not an error."""

    async def apply(self, removed: Sequence[Lease], added: Sequence[Lease]) -> list[tuple[Lease, Exception]]:
        """Apply a burst of lease changes: ``removed`` first, then ``added``.

        Returns ``(lease, error)`` for each addition it could not make
        (``PeerRefused``, ``RouteTableFull`` or ``OSError``); the caller
        retries those later. Removals never fail: a peer that is not there
        is already removed (one that fails is logged; the periodic check
        prunes what stays). This default calls remove_peer/add_peer per
        lease and lets the event loop run every ``YIELD_EVERY`` calls, so a
        burst of thousands does not stall the data path; backends with a
        table of their own replace it once instead.
        """
        failures: list[tuple[Lease, Exception]] = []
        for done, lease in enumerate(removed, 1):
            try:
                await self.remove_peer(lease)
            except OSError as e:  # what stays behind is pruned by the periodic check
                log.error("removing peer %s (%s) failed: %s", lease.subnet, lease.public_ip, e)
            if done % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        for done, lease in enumerate(added, 1):
            try:
                await self.add_peer(lease)
            except (PeerRefused, OSError) as e:
                failures.append((lease, e))
            if done % YIELD_EVERY == 0:
                await asyncio.sleep(0)
        return failures

    @abc.abstractmethod
    async def close(self) -> None:
        """Remove everything open/set_subnet/add_peer added."""

    def stats(self) -> str | None:
        """A one-line summary of counters, logged periodically; None if there are none."""
        counters = self.counters()
        return counters.summary() if counters is not None else None

    def counters(self) -> Counters | None:
        """The fast path's counters now; None for a backend that forwards in the kernel."""
        return None

    def drop_ring(self) -> tuple[int, list[Drop]] | None:
        """The fast path's drop ring: records ever written, and the recent ones, oldest first;
        None for a backend that forwards in the kernel (it drops nothing in userspace)."""
        return None

    async def check(self) -> None:  # noqa: B027 - optional hook
        """Called periodically: restore state that someone removed behind our back."""

    def kept(self) -> Kept:
        """The routes, devices and lo address of tunproxy's that this backend uses now.

        Everything else of tunproxy's (see ``tunproxy.leftovers``) is removed
        by ``reconcile``, whichever backend left it.
        """
        return Kept()

    async def reconcile(self) -> None:
        """Called once, right after the first snapshot of leases is applied, before we report ready.

        Removes what an earlier (killed) run left that no current lease
        justifies: first this backend's own kind (``check``: routes into the
        overlay, neighbour and FDB entries), then tunproxy's state of any
        backend that this one does not use (``kept``): routes with tunproxy's
        protocol, stale ``tunproxy.*`` VXLAN devices, a stale TUN, host-gw's
        address on lo. One log line per thing removed.
        """
        await self.check()
        kept = self.kept()
        for what in await run_netlink(lambda ipr: sweep(ipr, kept)):
            log.info("removed %s, left by an earlier run", what)


YIELD_EVERY = 64  # peer operations between two turns of the event loop in a burst


class PeerRefused(Exception):
    """A lease this backend cannot serve; the message says why, for one log line."""


class RouteTableFull(PeerRefused):
    """The backend's route table is at its ``--max-routes`` limit; retried when room frees."""
