"""The lease fold: the registry's snapshots and events in, the routes to change out.

How it works, in the style of flannel's LeaseWatcher. A registry (etcd, a
static file) reports either a whole snapshot of the leases (at start, after a
reconnect, a compaction or SIGHUP) or a handful of watch events. ``reset`` and
``update`` fold either into the table and return only the net change as
``PeerChanges``: the leases to unroute and the leases to route, so a backend
programs each route once however many events a burst held. A lease whose
public IP or backend data changed comes out as removed-then-added.

This is the one place that decides which leases are routed:
* never our own: our subnet, or any lease naming our public IP (a stale
  lease of ours, or our new one seen in the watch a moment before the
  registry says it is ours); a host does not route to itself;
* only leases of our backend type; the others are held apart as
  ``foreign`` and reported once each, when first seen (flannel ignores
  them too: a vxlan host cannot reach a udp host).

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from .logonce import Said
from .model import Lease, LeaseAdded, LeaseEvent


@dataclass(frozen=True)
class PeerChanges:
    """What a fold changed: ``removed`` (the old leases) before ``added``; ``foreign`` newly seen."""

    removed: tuple[Lease, ...] = ()
    added: tuple[Lease, ...] = ()
    foreign: tuple[Lease, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.removed or self.added or self.foreign)


class LeaseWatcher:
    """Holds the peers' leases and turns snapshots and watch events into minimal changes.

    ``leases`` maps subnet to the lease routed (or to be routed) by our
    backend; ``foreign`` those of another backend type.
    """

    def __init__(
        self,
        backend_type: str,
        own_public_ip: IPv4Address | None = None,
        own_subnet: IPv4Network | None = None,
    ) -> None:
        self.backend_type = backend_type
        self.own_public_ip = own_public_ip
        self.own_subnet = own_subnet
        self.leases: dict[IPv4Network, Lease] = {}
        self.foreign: dict[IPv4Network, Lease] = {}

    def _ours(self, lease: Lease) -> bool:
        return lease.subnet == self.own_subnet or lease.public_ip == self.own_public_ip

    def reset(self, snapshot: Iterable[Lease]) -> PeerChanges:
        """Replace the table with a full listing; return what it changed."""
        fresh = {lease.subnet: lease for lease in snapshot}
        return self._fold({subnet: fresh.get(subnet) for subnet in {*self.leases, *self.foreign, *fresh}})

    def update(self, events: Iterable[LeaseEvent]) -> PeerChanges:
        """Apply watch events in order; duplicates and events for our own subnet come out as nothing."""
        latest: dict[IPv4Network, Lease | None] = {}
        for event in events:
            latest[event.subnet] = event.lease if isinstance(event, LeaseAdded) else None
        return self._fold(latest)

    def set_own_subnet(self, subnet: IPv4Network) -> PeerChanges:
        """Our lease changed (re-acquired after loss): stop routing to it if a peer had it."""
        self.own_subnet = subnet
        return self._fold({subnet: self.leases.get(subnet) or self.foreign.get(subnet)})

    def _fold(self, latest: dict[IPv4Network, Lease | None]) -> PeerChanges:
        removed: list[Lease] = []
        added: list[Lease] = []
        foreign: list[Lease] = []
        for subnet, lease in latest.items():
            if lease is not None and self._ours(lease):
                lease = None
            old = self.leases.pop(subnet, None)
            was_foreign = self.foreign.pop(subnet, None)
            if lease is None:
                new = None
            elif lease.backend_type == self.backend_type:
                new = self.leases[subnet] = lease
            else:
                self.foreign[subnet] = lease
                if was_foreign is None:
                    foreign.append(lease)
                new = None
            if old is not None and old != new:
                removed.append(old)
            if new is not None and old != new:
                added.append(new)
        return PeerChanges(tuple(removed), tuple(added), tuple(foreign))


class Waiting:
    """The leases the backend refused, kept for a retry, and the reason last said for each.

    The daemon feeds it each fold's changes (``settle``) and each refusal
    (``refused``); it answers what the backend must really remove (a lease
    that never got in has nothing to undo), what to offer again (``take``,
    once per burst), and which refusals are news worth a line (each
    lease's reason once, again only when it changes). Pure.
    """

    def __init__(self) -> None:
        self.leases: dict[IPv4Network, Lease] = {}
        self._said = Said()

    def __len__(self) -> int:
        return len(self.leases)

    def __contains__(self, subnet: object) -> bool:
        return subnet in self.leases

    def reason(self, subnet: IPv4Network) -> str | None:
        """Why ``subnet`` waits (the last refusal's text), or None."""
        said = self._said.get(subnet)
        return str(said) if said is not None and subnet in self.leases else None

    def settle(self, changes: PeerChanges) -> list[Lease]:
        """Forget waiting leases that are gone or replaced; the removals the backend must make."""
        removed = []
        for lease in changes.removed:
            self._said.forget(lease.subnet)
            if self.leases.pop(lease.subnet, None) is None:
                removed.append(lease)
        for lease in changes.added:
            self.leases.pop(lease.subnet, None)
        return removed

    def take(self) -> list[Lease]:
        """Every waiting lease, to offer the backend again; they wait again if refused again."""
        waiting, self.leases = list(self.leases.values()), {}
        return waiting

    def refused(self, lease: Lease, reason: str) -> bool:
        """Keep ``lease`` for a retry; True if ``reason`` is news for it (worth a log line)."""
        self.leases[lease.subnet] = lease
        return self._said.due(lease.subnet, reason)
