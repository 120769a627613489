"""The lease table as a pure diff, in the style of flannel's LeaseWatcher.

How it works: a registry (etcd, a static file) gives us either a whole
snapshot of the leases (at start, after a reconnect, after a compaction, after
SIGHUP) or a handful of changes from a watch. ``reset`` and ``update`` fold
either into the table and return only what changed, as ``added``/``removed``
events, so a backend programs each route once. A lease whose public IP or
backend data changed comes out as removed-then-added. Our own subnet, and any
lease naming our own public IP (a stale lease of ours, or our new one seen in
the watch a moment before the registry says it is ours), is never reported: a
host does not route to itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from ipaddress import IPv4Address, IPv4Network

from .subnets import Lease


class EventKind(Enum):
    ADDED = "added"
    REMOVED = "removed"


@dataclass(frozen=True)
class LeaseEvent:
    kind: EventKind
    lease: Lease

    @classmethod
    def added(cls, lease: Lease) -> LeaseEvent:
        return cls(EventKind.ADDED, lease)

    @classmethod
    def removed(cls, lease: Lease) -> LeaseEvent:
        return cls(EventKind.REMOVED, lease)


class LeaseWatcher:
    """Holds the peers' leases and turns snapshots and watch events into minimal changes."""

    def __init__(
        self, own_subnet: IPv4Network | None = None, own_public_ip: IPv4Address | None = None
    ) -> None:
        self.own_subnet = own_subnet
        self.own_public_ip = own_public_ip
        self.leases: dict[IPv4Network, Lease] = {}

    def _ours(self, lease: Lease) -> bool:
        return lease.subnet == self.own_subnet or lease.public_ip == self.own_public_ip

    def reset(self, snapshot: Iterable[Lease]) -> list[LeaseEvent]:
        """Replace the table with a full listing; return what it changed."""
        fresh = {lease.subnet: lease for lease in snapshot if not self._ours(lease)}
        events = [LeaseEvent.removed(old) for subnet, old in self.leases.items() if fresh.get(subnet) != old]
        events += [LeaseEvent.added(new) for subnet, new in fresh.items() if self.leases.get(subnet) != new]
        self.leases = fresh
        return events

    def update(self, changes: Iterable[LeaseEvent]) -> list[LeaseEvent]:
        """Apply watch events; duplicates and events for our own subnet come out as nothing."""
        out: list[LeaseEvent] = []
        for change in changes:
            subnet = change.lease.subnet
            if subnet == self.own_subnet:
                continue
            current = self.leases.get(subnet)
            if change.kind is EventKind.ADDED:
                if self._ours(change.lease):
                    if current is not None:  # a peer's subnet is now ours
                        del self.leases[subnet]
                        out.append(LeaseEvent.removed(current))
                    continue
                if current == change.lease:
                    self.leases[subnet] = change.lease  # keep the newer expiration
                    continue
                if current is not None:
                    out.append(LeaseEvent.removed(current))
                self.leases[subnet] = change.lease
                out.append(change)
            elif current is not None:
                del self.leases[subnet]
                out.append(LeaseEvent.removed(current))
        return out

    def set_own_subnet(self, subnet: IPv4Network) -> list[LeaseEvent]:
        """Our lease changed (re-acquired after loss): stop routing to the new one if a peer had it."""
        self.own_subnet = subnet
        gone = self.leases.pop(subnet, None)
        return [LeaseEvent.removed(gone)] if gone else []
