"""Which subnet to take, and what a listing says: pure, so it is unit-tested without etcd.

How it works (flannel's ``tryAcquireLease``). ``plan_acquisition`` looks at a
listing of ``<prefix>/subnets/`` and returns a ``Plan``. A key that already
names our public IP and fits the config is reused (a reservation, a key with
no etcd lease, is preferred: an operator put it there); our keys that no
longer fit are deleted (reservations are never deleted); else the subnet from
the previous subnet.env if nobody holds it; else a random free one. Every key
present, even one whose value does not parse, is taken. The registry writes
the plan with a transaction that fails if the key changed (or exists, for a
new one) and asks again after a lost race.

``config_drift`` says why a changed config is not applied at runtime.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from ipaddress import IPv4Network

from ..model import ConfigError, Lease, NetworkConfig

# --- acquisition -----------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One key under ``<prefix>/subnets/`` as acquisition sees it."""

    subnet: IPv4Network
    lease: Lease | None  # None: the value does not parse (the key is still taken)
    etcd_lease: int = 0  # 0: no etcd lease attached, a reservation
    mod_revision: int = 0

    @property
    def reservation(self) -> bool:
        """True for a key with no etcd lease: an operator's reservation, never expired or deleted by us."""
        return self.etcd_lease == 0


class PlanKind(Enum):
    """How a ``Plan`` writes our key."""

    CREATE = "create"  # a new key, only if it does not exist
    RENEW = "renew"  # our existing key, re-put with a fresh etcd lease
    RESERVED = "reserved"  # a reservation naming us: used as is, no etcd lease


@dataclass(frozen=True)
class Plan:
    """What ``plan_acquisition`` decided: the key to write, under which condition, and what to clean up."""

    kind: PlanKind
    subnet: IPv4Network
    mod_revision: int = 0  # for RENEW/RESERVED: the key must still be at this revision
    write: bool = True  # RESERVED only: False if the value already says what we would write
    stale: tuple[Entry, ...] = ()  # our own leased keys that no longer fit the config: delete them
    replaces: int = 0  # RENEW: the etcd lease the key is on now; revoked once the key moves off it


def same_attributes(a: Lease, b: Lease) -> bool:
    """True if ``a`` and ``b`` advertise the same PublicIP, BackendType and BackendData (subnets aside)."""
    return (a.public_ip, a.backend_type, a.backend_data) == (b.public_ip, b.backend_type, b.backend_data)


def plan_acquisition(
    config: NetworkConfig,
    entries: Iterable[Entry],
    desired: Lease,
    previous: IPv4Network | None,
    rng: random.Random,
) -> Plan:
    """Decide which subnet to take, flannel's way; raises ConfigError if none is free.

    ``desired`` carries our public IP and backend; its subnet is ignored.
    """
    entries = list(entries)
    mine = [e for e in entries if e.lease is not None and e.lease.public_ip == desired.public_ip]
    fitting = [e for e in mine if config.fits(e.subnet)]
    stale = tuple(e for e in mine if not config.fits(e.subnet) and not e.reservation)
    if fitting:
        best = min(fitting, key=lambda e: (not e.reservation, e.subnet != previous, e.subnet))
        if best.reservation:
            assert best.lease is not None
            write = not same_attributes(best.lease, desired)
            return Plan(PlanKind.RESERVED, best.subnet, best.mod_revision, write, stale)
        return Plan(PlanKind.RENEW, best.subnet, best.mod_revision, True, stale, best.etcd_lease)
    taken = [e.subnet for e in entries if e not in stale]
    return Plan(PlanKind.CREATE, choose_subnet(config, taken, previous, rng), stale=stale)


def choose_subnet(
    config: NetworkConfig,
    taken: Iterable[IPv4Network],
    previous: IPv4Network | None,
    rng: random.Random,
) -> IPv4Network:
    """The previous subnet if it fits and is free, else a random free one; ConfigError if none is.

    A taken subnet of another size (left by an older SubnetLen) blocks every
    candidate it overlaps.
    """
    same: set[IPv4Network] = set()
    other: list[IPv4Network] = []
    for subnet in taken:
        if subnet.prefixlen == config.subnet_len:
            same.add(subnet)
        else:
            other.append(subnet)

    def free(candidate: IPv4Network) -> bool:
        return candidate not in same and not any(candidate.overlaps(o) for o in other)

    if previous is not None and config.fits(previous) and free(previous):
        return previous
    candidates = [c for c in config.candidate_subnets() if free(c)]
    if not candidates:
        total = sum(1 for _ in config.candidate_subnets())
        raise ConfigError(
            f"no free subnet in {config.network}: all {total} /{config.subnet_len} subnets "
            f"from SubnetMin {config.subnet_min} to SubnetMax {config.subnet_max} are leased or reserved"
        )
    return rng.choice(candidates)


def config_drift(running: NetworkConfig, stored: bytes | None) -> str | None:
    """Why the config now in etcd cannot be applied to a running daemon, or None if it changes nothing.

    A backend never changes at runtime (routes, devices and every peer's
    lease would have to change together), and neither does the network: a
    change is reported so the operator restarts every host, and the running
    table stays in force.
    """
    if stored is None:
        return "the network config was deleted from etcd; keeping the one we started with"
    try:
        new = NetworkConfig.parse(stored)
    except ConfigError as e:
        return f"the network config in etcd is now unusable ({e}); keeping the one we started with"
    if new.backend_type != running.backend_type:
        return (
            f"Backend.Type changed in etcd from {running.backend_type} to {new.backend_type}; "
            "tunproxy never changes backend at runtime: restart it on every host to apply"
        )
    if new != running:
        return "the network config in etcd changed; not applied at runtime: restart every host to apply"
    return None


def race_delay(races: int, rng: random.Random) -> float:
    """Seconds to wait before choosing again after losing ``races`` (>= 1) write races in a row:
    random, up to 20 ms doubled per race and at most 1 s, so hosts that raced spread out."""
    return rng.uniform(0, min(1.0, 0.02 * 2**races))
