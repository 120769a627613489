"""What a running daemon knows about itself, as plain data: the sans-IO core of
``tunproxy status``, ``/readyz``, ``/metrics`` and the systemd notifications.

How it works: a ``DaemonState`` holds what the daemon knows (our lease, the
peers the backend was given and any it has not applied, whether the first
peer listing is applied, shutdown); the observer fills it from the daemon.
Nothing here does I/O or reads a clock. A ``Sampler`` is fed
counter snapshots with the time they were taken (once a second by the
observer) and keeps what one snapshot cannot say: rates over the last interval
and, per peer, when its received-packet counter last moved ("last seen", so
with the sampling interval as resolution). ``status_document`` folds both into
the one JSON document the control socket serves; ``format_status`` renders it
as the table ``tunproxy status`` prints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from .counters import PEER_COUNTERS
from .model import Lease

# Daemon phases, in the order a healthy start goes through them.
STARTING = "starting"  # before our lease is held
PROGRAMMING = "programming"  # lease held, the peers not yet all programmed
READY = "ready"
LEASE_LOST = "lease lost"  # the registry is re-acquiring our lease
STOPPING = "stopping"


@dataclass
class PeerState:
    """A peer the registry told us about, and whether the backend took it."""

    lease: Lease
    error: str | None = None  # why the backend could not program it, if it could not


@dataclass
class DaemonState:
    """Facts the daemon reports as they happen (see the module docstring).

    ``lease_problem`` is the registry's word that our lease is gone and being
    re-acquired (None while it is held); ``store`` is the registry's own
    description (kind, reachability, watch revision or peers file).
    """

    backend: str | None = None
    underlay: str | None = None
    public_ip: IPv4Address | None = None
    network: IPv4Network | None = None
    mtu: int | None = None
    lease: Lease | None = None
    lease_expiry: float | None = None
    """When our lease runs out unless renewed (Unix time; None: it does not, as a static one)."""
    synced: bool = False
    stopping: bool = False
    lease_problem: str | None = None
    store: dict[str, Any] = field(default_factory=dict)
    peers: dict[IPv4Network, PeerState] = field(default_factory=dict)

    def readiness(self) -> tuple[str, str]:
        """(phase, reason): the reason is one line saying why the phase is not READY ("" if it is).

        Ready means, as ``/readyz`` and systemd's READY=1 promise: our lease is
        held and the first full list of peers has been handed to the backend.
        A peer the backend refused or could not program (it is retried) does
        not hold readiness back, since one bad lease must not take a node out
        of service; it shows in ``status`` as not programmed, with the reason.
        """
        if self.stopping:
            return STOPPING, "shutting down"
        if self.lease_problem:
            return LEASE_LOST, self.lease_problem
        if self.lease is None:
            return STARTING, "waiting for our subnet lease"
        if not self.synced:
            return PROGRAMMING, "waiting for the first list of peers"
        return READY, ""


@dataclass(frozen=True)
class PeerSample:
    """One peer's counters in a sample; packets and bytes since the fast path was built."""

    tx_packets: int
    tx_bytes: int
    rx_packets: int
    rx_bytes: int


@dataclass(frozen=True)
class Sample:
    """Counters at one moment ``at`` (monotonic seconds): totals by name, drops by reason, per peer."""

    at: float
    totals: Mapping[str, int]
    drops: Mapping[str, int]
    peers: Mapping[IPv4Address, PeerSample]


class Sampler:
    """Rates over the last interval and per-peer last-seen times, from successive samples."""

    def __init__(self) -> None:
        self.previous: Sample | None = None
        self.latest: Sample | None = None
        self.last_rx: dict[IPv4Address, float] = {}  # peer -> when its rx_packets last grew

    def add(self, sample: Sample) -> None:
        """Make ``sample`` the latest and the old latest ``previous``.

        A peer whose ``rx_packets`` grew since the latest was last seen at ``sample.at``.
        """
        prev = self.latest
        for addr, peer in sample.peers.items():
            before = prev.peers.get(addr) if prev else None
            if peer.rx_packets and (before is None or peer.rx_packets > before.rx_packets):
                self.last_rx[addr] = sample.at
        for gone in set(self.last_rx) - set(sample.peers):
            del self.last_rx[gone]
        self.previous, self.latest = prev, sample

    def _rate(self, pick: Any) -> float | None:
        a, b = self.previous, self.latest
        if a is None or b is None or b.at <= a.at:
            return None
        try:
            return max(0.0, (pick(b) - pick(a)) / (b.at - a.at))
        except (KeyError, AttributeError, TypeError):
            return None  # the peer (or counter) was not in the older sample

    def peer_rates(self, addr: IPv4Address) -> dict[str, float | None]:
        """Per-second rates of each per-peer counter over the last interval; None if there is none yet."""
        return {n: self._rate(lambda s, n=n: getattr(s.peers[addr], n)) for n in PEER_COUNTERS}

    def drop_rate(self, reason: str) -> float | None:
        """Drops per second for ``reason`` over the last interval; None without one."""
        return self._rate(lambda s: s.drops[reason])

    def last_seen(self, addr: IPv4Address, now: float) -> float | None:
        """Seconds since a packet from ``addr`` last arrived (as of the latest sample), or None if never."""
        at = self.last_rx.get(addr)
        return None if at is None else max(0.0, now - at)


def status_document(
    state: DaemonState, sampler: Sampler, now: float, wall: float, current: Sample | None = None
) -> dict[str, Any]:
    """The one JSON-able document of ``tunproxy status --json``.

    ``now`` is monotonic seconds (for last-seen), ``wall`` the Unix time (for
    the lease's time left). Counters are ``current`` (a snapshot taken for
    this answer) or else the sampler's latest; rates are per second over the
    sampler's last interval, null while it has only one sample.
    """
    phase, reason = state.readiness()
    lease = state.lease
    expires = state.lease_expiry if lease else None
    sample = current or sampler.latest
    peers = []
    for subnet, peer in sorted(state.peers.items()):
        ip = peer.lease.public_ip
        counters = sample.peers.get(ip) if sample else None
        row: dict[str, Any] = {
            "subnet": str(subnet),
            "public_ip": str(ip),
            "backend_type": peer.lease.backend_type,
            "programmed": peer.error is None,
            "error": peer.error,
        }
        if counters is not None:
            rates = sampler.peer_rates(ip)
            row |= {
                "tx_packets": counters.tx_packets,
                "tx_bytes": counters.tx_bytes,
                "rx_packets": counters.rx_packets,
                "rx_bytes": counters.rx_bytes,
                **{f"{name}_per_second": rate for name, rate in rates.items()},
                "last_seen_seconds": _last_seen(sampler, ip, counters, now),
            }
        peers.append(row)
    drops = {}
    if sample:
        drops = {
            reason_: {"total": total, "per_second": sampler.drop_rate(reason_)}
            for reason_, total in sample.drops.items()
        }
    return {
        "phase": phase,
        "ready": phase == READY,
        "reason": reason,
        "backend": state.backend,
        "underlay": state.underlay,
        "public_ip": str(state.public_ip) if state.public_ip else None,
        "network": str(state.network) if state.network else None,
        "subnet": str(lease.subnet) if lease else None,
        "mtu": state.mtu,
        "lease": {
            "expires": expires,
            "expires_in_seconds": None if expires is None else max(0.0, expires - wall),
        },
        "store": dict(state.store),
        "peers": peers,
        "drops": drops,
        "counters": dict(sample.totals) if sample else {},
    }


def _last_seen(sampler: Sampler, ip: IPv4Address, counters: PeerSample, now: float) -> float | None:
    latest = sampler.latest.peers.get(ip) if sampler.latest else None
    if counters.rx_packets and (latest is None or counters.rx_packets > latest.rx_packets):
        return 0.0  # arrived since the last sample
    return sampler.last_seen(ip, now)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{seconds:.0f}s" if seconds >= 1 or seconds == 0 else "<1s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 2 * 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _si(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.1f}{prefix}{unit}"
    return f"{value:.0f}{unit}"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def format_status(doc: Mapping[str, Any]) -> str:
    """``tunproxy status`` as text: a header, the peers table, the drops table."""
    lines = []
    state = doc["phase"] + (f" ({doc['reason']})" if doc.get("reason") else "")
    lines.append(f"state     {state}")
    lines.append(
        f"backend   {doc.get('backend') or '-'} on {doc.get('underlay') or '-'}, "
        f"public ip {doc.get('public_ip') or '-'}, mtu {doc.get('mtu') or '-'}"
    )
    lease = doc.get("lease") or {}
    left = lease.get("expires_in_seconds")
    lines.append(
        f"subnet    {doc.get('subnet') or '-'} of {doc.get('network') or '-'}, "
        f"lease {'does not expire' if left is None else _duration(left) + ' left'}"
    )
    store = doc.get("store") or {}
    if store.get("kind") == "etcd":
        reach = "reachable" if store.get("reachable") else "UNREACHABLE"
        lines.append(
            f"store     etcd {store.get('endpoints')} {reach}, watch revision {store.get('watch_revision')}"
        )
    elif store.get("kind") == "static":
        source = store.get("peers_file") or "--peer flags only"
        lines.append(f"store     static, peers file {source}")
    peers = doc.get("peers") or []
    lines.append("")
    if peers:
        head = "SUBNET,PUBLIC IP,TX PKTS,TX BYTES,RX PKTS,RX BYTES,TX/s,RX/s,LAST RX".split(",")
        rows = [head]
        for p in peers:
            if "tx_packets" not in p:
                rows.append([p["subnet"], p["public_ip"], *["-"] * 7])
            else:
                rows.append(
                    [
                        p["subnet"],
                        p["public_ip"],
                        str(p["tx_packets"]),
                        _si(p["tx_bytes"], "B"),
                        str(p["rx_packets"]),
                        _si(p["rx_bytes"], "B"),
                        _si(_bits(p.get("tx_bytes_per_second")), "bit"),
                        _si(_bits(p.get("rx_bytes_per_second")), "bit"),
                        _duration(p.get("last_seen_seconds")) if p.get("rx_packets") else "never",
                    ]
                )
            if p.get("error"):
                rows[-1][-1] += f"  NOT PROGRAMMED: {p['error']}"
        lines += _table(rows)
    else:
        lines.append("no peers")
    drops = doc.get("drops") or {}
    if drops:
        lines.append("")
        rows = [["DROP REASON", "PACKETS", "PER SECOND"]]
        for reason, d in drops.items():
            rate = d.get("per_second")
            rows.append([reason, str(d["total"]), "-" if rate is None else f"{rate:.1f}"])
        lines += _table(rows)
    return "\n".join(lines)


def _bits(bytes_per_second: float | None) -> float | None:
    return None if bytes_per_second is None else bytes_per_second * 8


def changed_fields(previous: str | None, current: str) -> str:
    """The ``name=value`` fields of ``current`` that differ from ``previous`` (all of them if None).

    Used for the periodic ``stats:`` log line, so a quiet daemon logs little.
    Fields that are not ``name=value`` are kept as they are.
    """
    if previous is None:
        return current
    before = dict(f.split("=", 1) for f in previous.split() if "=" in f)
    out = [f for f in current.split() if "=" not in f or before.get(f.split("=", 1)[0]) != f.split("=", 1)[1]]
    return " ".join(out)
