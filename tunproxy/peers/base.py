"""The registry interface: the daemon's only view of where leases come from.

A registry yields ``Update`` values: a full ``Snapshot`` of the peers' leases
(at start and whenever it had to relist) or ``Changes`` from a watch, plus
``OwnLease`` when our own lease had to be acquired again. The daemon folds
them through a ``LeaseWatcher`` and hands the result to the backend.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from ..model import Lease, LeaseEvent, NetworkConfig


@dataclass(frozen=True)
class Snapshot:
    """Every peer lease as of now: the daemon's table becomes exactly this."""

    leases: tuple[Lease, ...]


@dataclass(frozen=True)
class Changes:
    """Lease events since the previous update, in the order they happened."""

    events: tuple[LeaseEvent, ...]


@dataclass(frozen=True)
class OwnLease:
    """Our own lease was acquired again (perhaps another subnet): the daemon reconfigures for it."""

    lease: Lease


Update = Snapshot | Changes | OwnLease


class Registry(abc.ABC):
    """Where leases come from (etcd, or a static list); the module docstring gives the update stream."""

    @abc.abstractmethod
    async def network_config(self) -> NetworkConfig:
        """The network config; may wait (and log) until a valid one exists."""

    @abc.abstractmethod
    async def acquire(self, public_ip: IPv4Address, backend_type: str, backend_data: Any) -> Lease:
        """Lease our subnet, advertising how peers reach us."""

    @abc.abstractmethod
    def updates(self) -> AsyncIterator[Update]:
        """Peers' leases, as a snapshot first and then as they change; runs until cancelled."""

    def lease_expiry(self) -> float | None:
        """When our lease runs out unless renewed, in Unix time; None for a lease that does not."""
        return None

    @property
    def lease_problem(self) -> str | None:
        """Why our lease is not held just now (lost, being re-acquired); None while it is."""
        return None

    def describe(self) -> dict[str, Any]:
        """The store, for ``tunproxy status`` and /metrics: at least ``kind`` (``etcd``, ``static``)."""
        return {"kind": type(self).__name__}

    def reload(self) -> None:  # noqa: B027 - optional hook
        """SIGHUP: re-read whatever can be re-read."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; a lease stays until it expires, so a restart keeps its subnet."""
