"""The fast path's counters as Python sees them: what each means, and a snapshot (pure: no cffi).

The counters are the fields of ``struct fp_counters`` in
``tunproxy/fastpath_c/fastpath.h``, the one list of their names:
``tunproxy.fastpath`` reads them from the struct itself. This module only
describes them (``COUNTERS``), so /metrics, a saved bench result or a
daemon's ``stats:`` line can be explained without the compiled extension, and
holds ``Counters``, what ``FastPath.counters()`` returns, and ``Drop``, a record
of its drop ring. A unit test holds
``COUNTERS`` to exactly the struct's fields, in the struct's order, so the
two cannot drift apart.

The ``drop_<reason>`` fields are the drop counters; in a ``stats:`` line, a
status document or /metrics' ``reason`` label they go by ``<reason>`` alone
(``DROP_REASONS``, in the order of the C side's ``FP_DROP_*`` codes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from ipaddress import IPv4Address

DROP_PREFIX = "drop_"
DROP_SNAP = 96  # bytes of a dropped packet the drop ring keeps: fastpath.h FP_DROP_SNAP, checked at import


@dataclass(frozen=True)
class Counter:
    """One counter: ``help`` is one sentence (a Prometheus HELP text), ``unit`` what one
    count is, ``gauge`` True for a high-water mark rather than a running total."""

    help: str
    unit: str
    gauge: bool = False


COUNTERS: dict[str, Counter] = {
    "tx_packets": Counter("Packets sent to peers (TUN -> UDP).", "packets"),
    "tx_bytes": Counter("Bytes of inner packets sent to peers.", "bytes"),
    "rx_packets": Counter("Packets received from peers and written to the TUN.", "packets"),
    "rx_bytes": Counter("Bytes of inner packets received from peers.", "bytes"),
    "drop_no_route": Counter(
        "Dropped: destination in no peer's subnet (ICMP net unreachable sent).", "packets"
    ),
    "drop_ttl": Counter("Dropped: TTL would reach 0 (ICMP time exceeded sent).", "packets"),
    "drop_malformed": Counter(
        "Dropped: short, not IPv4, bad header length or checksum, length beyond what was read.",
        "packets",
    ),
    "drop_unknown_peer": Counter("Dropped: a datagram from an address that is no peer's.", "datagrams"),
    "drop_too_big": Counter(
        "Dropped: larger than the tunnel MTU with DF set (ICMP frag-needed sent), "
        "or larger than a ring slot.",
        "packets",
    ),
    "drop_tun_write": Counter("Dropped: the TUN refused the write (queue full).", "packets"),
    "drop_send": Counter("Dropped: the UDP send failed (socket buffer full, unreachable).", "packets"),
    "drop_spoofed": Counter(
        "Dropped: from a known peer, but the inner source does not route back to that peer.", "packets"
    ),
    "icmp_sent": Counter("ICMP errors sent for dropped packets.", "packets"),
    "icmp_ratelimited": Counter("ICMP errors not sent because of the rate limit.", "packets"),
    "tx_batches": Counter("sendmmsg calls that sent at least one datagram.", "calls"),
    "tx_multi_batches": Counter("sendmmsg calls that sent more than one datagram.", "calls"),
    "tx_max_batch": Counter("Most datagrams one sendmmsg call has sent.", "datagrams", gauge=True),
    "rx_batches": Counter("recvmmsg calls that returned at least one datagram.", "calls"),
    "rx_multi_batches": Counter("recvmmsg calls that returned more than one datagram.", "calls"),
    "rx_max_batch": Counter("Most datagrams one recvmmsg call has returned.", "datagrams", gauge=True),
    "tso_packets": Counter("TSO super-packets read from the TUN (offload mode).", "packets"),
    "tso_segments": Counter("Packets cut from TSO super-packets.", "packets"),
    "csum_completed": Counter("Partial checksums completed for the TUN's other packets.", "packets"),
    "gso_sends": Counter("Messages sent with UDP_SEGMENT carrying several datagrams.", "messages"),
    "gso_segments": Counter("Datagrams in those messages.", "datagrams"),
    "gro_receives": Counter("Received UDP_GRO buffers holding several datagrams.", "buffers"),
    "gro_segments": Counter("Datagrams in those buffers.", "datagrams"),
    "tun_gso_writes": Counter("TUN writes of several coalesced TCP segments.", "writes"),
    "tun_gso_segments": Counter("TCP segments in those writes.", "segments"),
    "uso_packets": Counter("UDP trains (USO, VIRTIO_NET_HDR_GSO_UDP_L4) read from the TUN.", "packets"),
    "uso_segments": Counter("Datagrams cut from those trains.", "datagrams"),
    "tun_uso_writes": Counter("TUN writes of several coalesced UDP datagrams (USO).", "writes"),
    "tun_uso_segments": Counter("UDP datagrams in those writes.", "datagrams"),
}

DROP_REASONS: tuple[str, ...] = tuple(
    name.removeprefix(DROP_PREFIX) for name in COUNTERS if name.startswith(DROP_PREFIX)
)


def short_name(field: str) -> str:
    """The name a counter goes by in a ``stats:`` line: the field's, a drop counter's without ``drop_``."""
    return field.removeprefix(DROP_PREFIX)


@dataclass(frozen=True)
class PeerCounters:
    """One peer's share of the traffic since it got its first route (``struct fp_peer``)."""

    tx_packets: int
    tx_bytes: int
    rx_packets: int
    rx_bytes: int


PEER_COUNTERS: tuple[str, ...] = tuple(f.name for f in fields(PeerCounters))
"""The per-peer counters, in ``struct fp_peer``'s order after its address and route count."""


@dataclass(frozen=True)
class Counters:
    """A snapshot of the fast path's counters (they only ever grow; a ``gauge`` is the largest yet).

    ``values`` holds every field of ``struct fp_counters`` by its C name, in the
    struct's order (``COUNTERS`` says what each means), and each is an attribute
    too (``c.tx_packets``); ``drops`` has the ``drop_*`` ones by reason. ``peers``
    has the peers some route points at.
    """

    values: Mapping[str, int]
    peers: dict[IPv4Address, PeerCounters]

    def __getattr__(self, name: str) -> int:
        # Only reached for names that are not real attributes; never for "values" once set.
        values = self.__dict__.get("values", {})
        if name not in values:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        value: int = values[name]
        return value

    @property
    def drops(self) -> dict[str, int]:
        """Packets dropped, by reason (``DROP_REASONS``)."""
        return {short_name(k): v for k, v in self.values.items() if k.startswith(DROP_PREFIX)}

    @property
    def totals(self) -> dict[str, int]:
        """Every counter but the drops, by field name."""
        return {k: v for k, v in self.values.items() if not k.startswith(DROP_PREFIX)}

    def summary(self) -> str:
        """One grep-able line of ``name=value`` for a log; names as in the README."""
        fields = {short_name(k): v for k, v in self.values.items()} | {"peers": len(self.peers)}
        return " ".join(f"{name}={value}" for name, value in fields.items())


@dataclass(frozen=True)
class Drop:
    """One dropped packet from the drop ring.

    ``time_ms`` is the ``now_ms`` passed to the call that dropped it (the
    caller's monotonic clock); ``direction`` is ``"tx"`` (read from the TUN,
    ``peer`` the next hop or None without a route) or ``"rx"`` (received,
    ``peer`` the sender); ``length`` is the packet's own length and ``data``
    its first ``DROP_SNAP`` bytes at most, from the IPv4 header on; ``count``
    is how many packets the record stands for (a refused train of datagrams
    is kept once).
    """

    time_ms: int
    reason: str
    direction: str
    peer: IPv4Address | None
    length: int
    count: int
    data: bytes
