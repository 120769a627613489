"""The decisions behind the etcd registry, without etcd: pure, so they are unit-tested.

How it works. ``etcd.py`` does the I/O and asks this module what to do:

* Acquiring a subnet (flannel's ``tryAcquireLease``): ``plan_acquisition`` looks
  at a listing of ``<prefix>/subnets/`` and returns a ``Plan``. A key that
  already names our public IP and fits the config is reused (a reservation,
  a key with no etcd lease, is preferred: an operator put it there); our
  keys that no longer fit are deleted (reservations are never deleted);
  else the subnet from the previous subnet.env if nobody holds it; else a
  random free one. Every key present, even one whose value does not parse,
  is taken. The I/O layer writes the plan with a transaction that fails if
  the key changed (or exists, for a new one) and asks again after a lost race.
* Renewal: the lease is kept alive ``margin`` seconds before it runs out;
  ``effective_renew_margin`` clamps a margin that is not below the TTL.
* Watching: ``WatchCursor`` holds the last revision applied. A watch resumes
  at revision+1; a compaction or a store that went backwards means list
  again and hand the daemon a snapshot.
* Retrying: ``Backoff`` doubles from 0.5 s to a cap; ``Throttle`` keeps a
  repeated error to one log line.
"""

from __future__ import annotations

import ipaddress
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from ipaddress import IPv4Network
from typing import Any
from urllib.parse import urlsplit

from ..model import ConfigError, Lease, LeaseError, NetworkConfig, parse_subnet_key


class Backoff:
    """Delays for retries: ``initial``, doubled each time up to ``cap``; ``reset()`` after a success."""

    def __init__(self, initial: float = 0.5, cap: float = 10.0, factor: float = 2.0) -> None:
        if not 0 < initial <= cap or factor < 1:
            raise ValueError("backoff needs 0 < initial <= cap and factor >= 1")
        self.initial = initial
        self.cap = cap
        self.factor = factor
        self._next = initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * self.factor)
        return delay

    def reset(self) -> None:
        self._next = self.initial


class Throttle:
    """Says whether to log a message: yes if it differs from the last one, or ``repeat`` s have passed."""

    def __init__(self, repeat: float = 60.0) -> None:
        self.repeat = repeat
        self._last: object = None
        self._at = 0.0

    def should_log(self, key: object, now: float) -> bool:
        if key != self._last or now - self._at >= self.repeat:
            self._last = key
            self._at = now
            return True
        return False

    def clear(self) -> None:
        self._last = None


def effective_renew_margin(ttl: float, margin: float) -> tuple[float, str | None]:
    """The renew margin to use for ``ttl``, and a warning if the requested one had to be clamped.

    A margin at or above the TTL would renew before the lease even exists; a
    margin of zero or less would renew after it expired. Either way we renew
    halfway through the lease instead.
    """
    if ttl <= 0:
        raise ConfigError(f"lease TTL {ttl:g}s must be positive")
    if 0 < margin < ttl:
        return margin, None
    half = ttl / 2
    if margin >= ttl:
        why = f"{margin:g}s is not below the lease TTL {ttl:g}s"
    else:
        why = f"{margin:g}s must be positive"
    return half, f"lease renew margin {why}; renewing halfway through the lease ({half:g}s before expiry)"


def renew_delay(granted_ttl: float, margin: float) -> float:
    """Seconds from a (re)grant or keep-alive until the next renewal."""
    if granted_ttl <= 0:
        return 0.0
    if margin < granted_ttl:
        return granted_ttl - margin
    return granted_ttl / 2  # etcd granted less than we asked for: stay safely inside it


def previous_subnet(text: str) -> IPv4Network | None:
    """The subnet named by a subnet.env's ``FLANNEL_SUBNET=10.100.5.1/24`` (-> 10.100.5.0/24)."""
    for line in text.splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and name.strip() == "FLANNEL_SUBNET":
            try:
                iface = ipaddress.ip_interface(value.strip().strip("\"'"))
            except ValueError:
                return None
            return iface.network if isinstance(iface.network, IPv4Network) else None
    return None


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
        return self.etcd_lease == 0


class PlanKind(Enum):
    CREATE = "create"  # a new key, only if it does not exist
    RENEW = "renew"  # our existing key, re-put with a fresh etcd lease
    RESERVED = "reserved"  # a reservation naming us: used as is, no etcd lease


@dataclass(frozen=True)
class Plan:
    kind: PlanKind
    subnet: IPv4Network
    mod_revision: int = 0  # for RENEW/RESERVED: the key must still be at this revision
    write: bool = True  # RESERVED only: False if the value already says what we would write
    stale: tuple[Entry, ...] = ()  # our own leased keys that no longer fit the config: delete them
    replaces: int = 0  # RENEW: the etcd lease the key is on now; revoked once the key moves off it


def same_attributes(a: Lease, b: Lease) -> bool:
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


# --- watching --------------------------------------------------------------


@dataclass
class WatchCursor:
    """Where the watch stands: the last revision applied, and whether to list first."""

    revision: int = 0
    need_list: bool = True

    def listed(self, revision: int) -> None:
        """A full listing at ``revision`` was handed out as a snapshot."""
        self.revision = revision
        self.need_list = False

    def start_revision(self) -> int:
        """Where a (re)started watch begins: nothing at or before ``revision`` is replayed."""
        return self.revision + 1

    def seen(self, revision: int) -> None:
        """Events up to ``revision`` (or a progress notification at it) were applied."""
        if revision > self.revision:
            self.revision = revision

    def compacted(self) -> None:
        """History after our revision is gone: only a fresh listing is correct."""
        self.need_list = True

    def store_at(self, current: int) -> bool:
        """The store reports ``current``; below our revision means it was restored or replaced."""
        if current < self.revision:
            self.need_list = True
            return False
        return True


class LeaseDecoder:
    """Parses lease values, reporting each bad key+value once however often it is seen."""

    def __init__(self) -> None:
        self._reported: set[tuple[str, bytes]] = set()

    def decode(
        self, key: str, value: bytes, network: IPv4Network | None = None
    ) -> tuple[Lease | None, str | None]:
        """The lease (or None) and a message to log (None if fine or already said)."""
        try:
            parse_subnet_key(key)
        except LeaseError as e:
            return None, self._once(key, b"", f"ignoring {key}: {e}")  # whatever the value
        try:
            lease = Lease.parse(key, value)
        except LeaseError as e:
            return None, self._once(key, value, f"ignoring {key}: {e}")
        if network is not None and not lease.subnet.subnet_of(network):
            message = f"ignoring {key}: {lease.subnet} is outside the network {network}"
            return None, self._once(key, value, message)
        return lease, None

    def _once(self, key: str, value: bytes, message: str) -> str | None:
        if (key, value) in self._reported:
            return None
        self._reported.add((key, value))
        return message

    def forget(self, key: str) -> None:
        """The key was deleted: a bad value written to it again is worth a new line."""
        self._reported = {kv for kv in self._reported if kv[0] != key}


def entry_from(key: str, value: bytes, etcd_lease: int, mod_revision: int) -> Entry | None:
    """An acquisition entry; None if the key is not a subnet key at all."""
    try:
        subnet = parse_subnet_key(key)
    except LeaseError:
        return None
    try:
        lease: Lease | None = Lease.parse(key, value)
    except LeaseError:
        lease = None
    return Entry(subnet, lease, etcd_lease, mod_revision)


# --- endpoints and output --------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def target(self) -> str:
        """The gRPC target."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_endpoints(text: str, tls: bool = False) -> tuple[Endpoint, ...]:
    """``http://a:2379,https://b:2379``; a bare ``host:port`` is https if ``tls`` else http."""
    endpoints = []
    for part in str(text).replace(" ", ",").split(","):
        part = part.strip()
        if not part:
            continue
        raw = part if "://" in part else f"{'https' if tls else 'http'}://{part}"
        try:
            url = urlsplit(raw)
            port = url.port or 2379
        except ValueError:
            raise ConfigError(f"etcd endpoint {part!r} is not a URL like http://192.0.2.100:2379") from None
        if url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/"):
            raise ConfigError(f"etcd endpoint {part!r} is not a URL like http://192.0.2.100:2379")
        endpoints.append(Endpoint(url.scheme, url.hostname, port))
    if not endpoints:
        raise ConfigError("no etcd endpoints given (e.g. --etcd-endpoints http://192.0.2.100:2379)")
    return tuple(endpoints)


def format_duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def format_leases(leases: Sequence[Mapping[str, Any]]) -> str:
    """A table of ``list_leases`` output: SUBNET PUBLIC-IP BACKEND EXPIRES-IN."""
    rows = [("SUBNET", "PUBLIC-IP", "BACKEND", "EXPIRES-IN")]
    for lease in leases:
        ttl = lease.get("ttl_left")
        rows.append(
            (
                str(lease["subnet"]),
                str(lease["public_ip"]),
                str(lease.get("backend_type") or ""),
                "never (reserved)" if ttl is None else format_duration(ttl),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3] for row in rows
    )


def lease_row(lease: Lease, ttl_left: int | None) -> dict[str, Any]:
    """One JSON-able row of ``tunproxy leases --json``."""
    return {
        "subnet": str(lease.subnet),
        "public_ip": str(lease.public_ip),
        "backend_type": lease.backend_type,
        "backend_data": json.loads(json.dumps(lease.backend_data)),
        "ttl_left": ttl_left,
    }


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
