"""The backend interface: how a lease becomes forwarding state on this host.

A backend is driven in this order, always from the event loop:

    await backend.open()               # devices exist; backend_data is known
    lease = registry.acquire(backend_data)
    await backend.set_subnet(subnet)   # our own address and the network route
    await backend.add_peer(lease) / remove_peer(lease)   # any number of times
    await backend.reconcile()          # once, after the first snapshot: a killed run's leftovers go
    await backend.close()              # everything it added is gone

Netlink calls are blocking (pyroute2 cannot run on uvloop), so backends do
them with ``asyncio.to_thread``; see ``tunproxy.netlink``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any, ClassVar

from ..netlink import Underlay
from ..subnets import Lease, NetworkConfig


@dataclass(frozen=True)
class BackendContext:
    network: NetworkConfig
    underlay: Underlay
    public_ip: IPv4Address
    options: dict[str, Any] = field(default_factory=dict)
    """Command-line knobs that are not part of the network config (tun name, batch, ...)."""


class Backend(abc.ABC):
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

    @abc.abstractmethod
    async def close(self) -> None:
        """Remove everything open/set_subnet/add_peer added."""

    def stats(self) -> str | None:
        """A one-line summary of counters, logged periodically; None if there are none."""
        return None

    async def check(self) -> None:  # noqa: B027 - optional hook
        """Called periodically: restore state that someone removed behind our back."""

    async def reconcile(self) -> None:
        """Called once, right after the first snapshot of leases is applied, before we report ready.

        Removes what an earlier (killed) run left that no current lease
        justifies: routes into the overlay, neighbour and FDB entries. The
        periodic ``check`` does the same work, so by default this is one
        check done now instead of ``--check-interval`` seconds later.
        """
        await self.check()


class PeerRefused(Exception):
    """A lease this backend cannot serve; the message says why, for one log line."""
