"""Python face of the C fast path of the udp backend (``_fastpath.c``).

``FastPath`` allocates, once, all the memory the C side works in: the context
(configuration, token bucket, counters), the packet ring with its
mmsghdr/iovec/sockaddr arrays, two route tables and two peer tables (the spare
ones let a route change be built aside and swapped in by one C call).  After
that each ``tun_to_udp``/``udp_to_tun`` call is one C call that handles a whole
batch and returns a count; a negative errno comes back as ``FastPathError``,
except EAGAIN/EINTR which just mean "nothing to do" (0).

With ``offload=True`` the TUN is expected to have been opened with
IFF_VNET_HDR and TSO4/CSUM offloads (every read and write then carries a
virtio_net_hdr), and the socket may have UDP_GRO on: the C side cuts TSO
packets into wire-sized ones and sends runs of datagrams with UDP_SEGMENT,
and writes runs of received TCP segments to the TUN as one TSO packet.  The
wire format does not change.  The extra memory (a send queue of copied
datagrams, the cmsg buffers, the iovecs of a coalesced TUN write) is
allocated here too, once.

Arguments are checked here, not in C; the C code trusts its caller.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from tunproxy._fastpath_cffi import ffi, lib

DROP_REASONS = ("no_route", "ttl", "malformed", "unknown_peer", "too_big", "tun_write", "send", "spoofed")
MAX_PACKET = lib.FP_MAX_PACKET
MAX_BATCH = 1024
MAX_HEADROOM = 4096
MAX_ROUTES = 1 << 20
INITIAL_ROUTES = 256
MAX_ICMP_RATE = 1_000_000
VNET_HDR_LEN = lib.FP_VNET_HDR_LEN
UDP_SEGMENT = 103  # linux/udp.h socket options at level SOL_UDP (not in Python's socket module)
UDP_GRO = 104
GSO_BUFFER = 1 << 20  # default bytes of copied datagrams queued before a sendmmsg

# TSO packets read and the packets cut from them; other partial checksums
# completed; UDP_SEGMENT sends of several datagrams and the datagrams in them;
# UDP_GRO buffers holding several datagrams and the datagrams in them; TUN
# writes of several coalesced TCP segments and the segments in them.
OFFLOAD_COUNTERS = (
    "tso_packets",
    "tso_segments",
    "csum_completed",
    "gso_sends",
    "gso_segments",
    "gro_receives",
    "gro_segments",
    "tun_gso_writes",
    "tun_gso_segments",
)

_PEER = struct.Struct("=II4Q")  # struct fp_peer
assert _PEER.size == ffi.sizeof("struct fp_peer")
DROP_SNAP = lib.FP_DROP_SNAP
_DROP = struct.Struct(f"=QIIBBHI{DROP_SNAP}s")  # struct fp_drop
assert _DROP.size == ffi.sizeof("struct fp_drop")
assert [getattr(lib, "FP_DROP_" + r.upper()) for r in DROP_REASONS] == list(range(len(DROP_REASONS)))
DEFAULT_DROP_RING = 256
_NOTHING_TO_DO = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)


class FastPathError(OSError):
    """A system call in the fast path failed, or the C side refused a request."""


class UdpGsoDisabled(FastPathError):
    """The kernel refused UDP_SEGMENT (``errno`` says how); the fast path now sends
    one datagram per message for good.  Raised once, by the ``tun_to_udp`` call in
    which it happened; those datagrams were still sent, and ``count`` is what
    that call would have returned.  The caller should log it and carry on."""

    def __init__(self, err: int, count: int) -> None:
        super().__init__(err, f"UDP GSO disabled, sending datagrams one by one: {os.strerror(err)}")
        self.count = count


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


@dataclass(frozen=True)
class PeerCounters:
    tx_packets: int
    tx_bytes: int
    rx_packets: int
    rx_bytes: int


@dataclass(frozen=True)
class Counters:
    """A snapshot of the fast path's counters (they only ever grow)."""

    tx_packets: int
    tx_bytes: int
    rx_packets: int
    rx_bytes: int
    drops: dict[str, int]
    icmp_sent: int
    icmp_ratelimited: int
    tx_batches: int
    tx_multi_batches: int
    tx_max_batch: int
    rx_batches: int
    rx_multi_batches: int
    rx_max_batch: int
    peers: dict[IPv4Address, PeerCounters]
    # Offload mode (all 0 without it); see OFFLOAD_COUNTERS.
    tso_packets: int = 0
    tso_segments: int = 0
    csum_completed: int = 0
    gso_sends: int = 0
    gso_segments: int = 0
    gro_receives: int = 0
    gro_segments: int = 0
    tun_gso_writes: int = 0
    tun_gso_segments: int = 0

    def summary(self) -> str:
        """One grep-able line of ``name=value`` for a log; names as in the README."""
        fields = {
            "tx_packets": self.tx_packets,
            "tx_bytes": self.tx_bytes,
            "rx_packets": self.rx_packets,
            "rx_bytes": self.rx_bytes,
            **self.drops,
            "icmp_sent": self.icmp_sent,
            "icmp_ratelimited": self.icmp_ratelimited,
            "tx_batches": self.tx_batches,
            "tx_multi_batches": self.tx_multi_batches,
            "tx_max_batch": self.tx_max_batch,
            "rx_batches": self.rx_batches,
            "rx_multi_batches": self.rx_multi_batches,
            "rx_max_batch": self.rx_max_batch,
            **{name: getattr(self, name) for name in OFFLOAD_COUNTERS},
            "peers": len(self.peers),
        }
        return " ".join(f"{name}={value}" for name, value in fields.items())


def _slots(routes: int, factor: int) -> int:
    """Slots of a hash table for ``routes`` entries: a power of two, at least ``factor`` times as many.

    Routes use 2 (never more than half full); peers 4, since during a batch
    the peers of routes being removed and of routes being added coexist.
    """
    return 1 << (factor * routes - 1).bit_length()


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, got {value}")
    return value


def _network(subnet: IPv4Network | str) -> IPv4Network:
    if isinstance(subnet, IPv4Network):
        return subnet
    if isinstance(subnet, str):
        try:
            return IPv4Network(subnet)  # strict: host bits must be zero
        except ValueError as e:
            raise ValueError(f"bad subnet {subnet!r}: {e}") from None
    raise TypeError(f"subnet must be an IPv4Network, not {type(subnet).__name__}")


def _peer(peer: IPv4Address | str) -> IPv4Address:
    if isinstance(peer, str):
        try:
            peer = IPv4Address(peer)
        except ValueError as e:
            raise ValueError(f"bad peer address {peer!r}: {e}") from None
    if not isinstance(peer, IPv4Address):
        raise TypeError(f"peer must be an IPv4Address, not {type(peer).__name__}")
    if peer.is_unspecified or peer.is_multicast or int(peer) >= 0xF0000000:
        raise ValueError(f"peer {peer} is not a unicast address")
    return peer


def _raise(rc: int, what: str) -> None:
    raise FastPathError(-rc, f"{what}: {os.strerror(-rc)}")


class FastPath:
    """The per-packet engine of the udp backend; single-threaded, not reentrant.

    ``mtu`` is the largest inner packet sent with DF set (bigger ones get an
    ICMP "fragmentation needed"); ``local_addr`` is the tunnel's own address,
    the source of the ICMP errors; every peer listens on UDP ``port``, and a
    datagram from any other address is dropped as ``unknown_peer``.
    A peer's packet whose inner source does not route back to that peer
    (longest prefix match, as WireGuard's allowed-ips) is dropped as
    ``spoofed``, unless ``allow_any_source`` is set (for setups that route
    foreign sources through a peer, such as a gateway behind it).
    ``slot_size`` (default ``headroom + 65535``, so any IPv4 packet fits) is
    the bytes per ring slot; the ring has ``batch`` slots.

    ``offload`` selects offload mode (see the module docstring): the TUN fd
    must then carry virtio_net_hdrs.  ``udp_gso`` (offload mode only) says
    whether the socket may send with UDP_SEGMENT; ``gso_buffer`` is how many
    bytes of datagrams are queued before a sendmmsg (at least 65535).
    """

    def __init__(
        self,
        *,
        mtu: int,
        local_addr: IPv4Address | str,
        port: int = 8285,
        batch: int = 64,
        headroom: int = 64,
        max_routes: int = 65536,
        icmp_rate: int = 100,
        icmp_burst: int = 50,
        slot_size: int | None = None,
        offload: bool = False,
        udp_gso: bool = True,
        gso_buffer: int = GSO_BUFFER,
        drop_ring: int = DEFAULT_DROP_RING,
        allow_any_source: bool = False,
    ) -> None:
        _check_int("mtu", mtu, 68, MAX_PACKET)
        _check_int("port", port, 1, 65535)
        _check_int("batch", batch, 1, MAX_BATCH)
        _check_int("headroom", headroom, 0, MAX_HEADROOM)
        _check_int("max_routes", max_routes, 1, MAX_ROUTES)
        _check_int("icmp_rate", icmp_rate, 0, MAX_ICMP_RATE)
        _check_int("icmp_burst", icmp_burst, 0, MAX_ICMP_RATE)
        _check_int("gso_buffer", gso_buffer, MAX_PACKET, 1 << 30)
        _check_int("drop_ring", drop_ring, 0, 1 << 20)
        if offload and headroom < VNET_HDR_LEN:
            raise ValueError(f"offload needs a headroom of at least {VNET_HDR_LEN}, got {headroom}")
        if slot_size is None:
            slot_size = headroom + MAX_PACKET
        # A TSO read is up to 64 KiB whatever the MTU: a smaller slot would cut it short.
        _check_int("slot_size", slot_size, headroom + (MAX_PACKET if offload else mtu), headroom + MAX_PACKET)
        try:
            local = IPv4Address(local_addr)
        except ValueError as e:
            raise ValueError(f"bad local_addr {local_addr!r}: {e}") from None

        self._local_addr = local
        self._port = port
        self._mtu = mtu
        self._batch = batch
        self._max_routes = max_routes
        # The table starts small and doubles as it fills, up to max_routes: memory follows use.
        capacity = min(max_routes, INITIAL_ROUTES)
        self._capacity = capacity
        self._route_cap = _slots(capacity, 2)
        self._peer_cap = _slots(capacity, 4)

        c = self._ctx = ffi.new("struct fp_ctx *")
        c.mtu = mtu
        c.local_addr = int(local)
        c.port = port
        c.batch = batch
        c.icmp_rate = icmp_rate
        c.icmp_burst = icmp_burst
        c.max_routes = capacity
        c.route_cap = self._route_cap
        c.peer_cap = self._peer_cap
        c.allow_any_source = bool(allow_any_source)
        if offload:
            c.offload = lib.FP_OFFLOAD_VNET | (lib.FP_OFFLOAD_UDP_GSO if udp_gso else 0)
        self._offload = bool(offload)
        # The slots need no clearing; leaving them untouched keeps them unbacked.
        raw = ffi.new_allocator(should_clear_after_alloc=False)
        # cdata assigned into a struct is not kept alive by it: hold it here.
        self._memory = {
            "data": raw("uint8_t[]", batch * slot_size),
            "len": ffi.new("uint32_t[]", batch),
            "addr": ffi.new("struct sockaddr_in[]", batch),
            "iov": ffi.new("struct iovec[]", batch),
            "msg": ffi.new("struct mmsghdr[]", batch),
            "routes": ffi.new("struct fp_route[]", self._route_cap),
            "routes_alt": ffi.new("struct fp_route[]", self._route_cap),
            "peers": ffi.new("struct fp_peer[]", self._peer_cap),
            "peers_alt": ffi.new("struct fp_peer[]", self._peer_cap),
            "drops": ffi.new("struct fp_drop[]", max(drop_ring, 1)),
        }
        m = self._memory
        ring = c.ring
        ring.data, ring.len, ring.addr, ring.iov, ring.msg = (
            m["data"],
            m["len"],
            m["addr"],
            m["iov"],
            m["msg"],
        )
        ring.nslots = batch
        ring.slot_size = slot_size
        ring.headroom = headroom
        c.routes, c.routes_alt = m["routes"], m["routes_alt"]
        c.peers, c.peers_alt = m["peers"], m["peers_alt"]
        c.drops, c.ndrops = m["drops"], drop_ring
        self._drop_ring = drop_ring
        if offload:
            # A 64 KiB TSO packet fills one or two messages, anything else at most one;
            # a queue that fills up anyway is just sent early.
            nmsg = 2 * batch + 16
            words = lib.FP_CMSG_WORDS
            m |= {
                "out": raw("uint8_t[]", gso_buffer),
                "gso_msg": ffi.new("struct mmsghdr[]", nmsg),
                "gso_iov": ffi.new("struct iovec[]", nmsg),
                "gso_addr": ffi.new("struct sockaddr_in[]", nmsg),
                "segs": ffi.new("uint32_t[]", nmsg),
                "seg_size": ffi.new("uint32_t[]", nmsg),
                "cmsg": ffi.new("uint64_t[]", nmsg * words),
                "rx_cmsg": ffi.new("uint64_t[]", batch * words),
                "tun_iov": ffi.new("struct iovec[]", lib.FP_GRO_MAX_SEGS + 1),
            }
            g = c.gso
            g.out, g.msg, g.iov, g.addr = m["out"], m["gso_msg"], m["gso_iov"], m["gso_addr"]
            g.segs, g.seg_size, g.cmsg, g.rx_cmsg = m["segs"], m["seg_size"], m["cmsg"], m["rx_cmsg"]
            g.tun_iov = m["tun_iov"]
            g.out_size = gso_buffer
            g.nmsg = nmsg
        rc = lib.fp_init(c)
        if rc < 0:
            _raise(rc, "fp_init")
        self._tun_to_udp = lib.fp_tun_to_udp
        self._udp_to_tun = lib.fp_udp_to_tun

    @property
    def mtu(self) -> int:
        return self._mtu

    @property
    def port(self) -> int:
        return self._port

    @property
    def batch(self) -> int:
        return self._batch

    @property
    def local_addr(self) -> IPv4Address:
        return self._local_addr

    @property
    def max_routes(self) -> int:
        return self._max_routes

    @property
    def offload(self) -> bool:
        return self._offload

    @property
    def allow_any_source(self) -> bool:
        """Whether anti-spoofing is off: a peer may send packets from any inner source."""
        return bool(self._ctx.allow_any_source)

    @property
    def udp_gso(self) -> bool:
        """Whether runs of datagrams still go out with UDP_SEGMENT (the kernel may refuse)."""
        return bool(self._ctx.offload & lib.FP_OFFLOAD_UDP_GSO)

    # ---- routes ----

    @property
    def capacity(self) -> int:
        """Routes the table holds before it grows again (it doubles, up to ``max_routes``)."""
        return self._capacity

    def _reserve(self, needed: int) -> None:
        """Grow the table to hold ``needed`` routes (doubling), never past ``max_routes``."""
        if needed <= self._capacity or self._capacity >= self._max_routes:
            return
        capacity = min(self._max_routes, max(needed, 2 * self._capacity))
        route_cap, peer_cap = _slots(capacity, 2), _slots(capacity, 4)
        fresh = {
            "routes": ffi.new("struct fp_route[]", route_cap),
            "routes_alt": ffi.new("struct fp_route[]", route_cap),
            "peers": ffi.new("struct fp_peer[]", peer_cap),
            "peers_alt": ffi.new("struct fp_peer[]", peer_cap),
        }
        tables = (fresh["routes"], fresh["routes_alt"], fresh["peers"], fresh["peers_alt"])
        rc = lib.fp_resize(self._ctx, *tables, capacity, route_cap, peer_cap)
        if rc < 0:
            _raise(rc, "resize")
        self._memory |= fresh  # the old arrays are freed only now that C no longer points at them
        self._capacity, self._route_cap, self._peer_cap = capacity, route_cap, peer_cap

    def set_routes(self, routes: Mapping[IPv4Network, IPv4Address]) -> None:
        """Replace the whole table in one step; on error the old one stays."""
        items = [(_network(net), _peer(peer)) for net, peer in routes.items()]
        if len(items) > self._max_routes:
            raise FastPathError(
                errno.ENOSPC, f"{len(items)} routes exceed the capacity of {self._max_routes}"
            )
        self._reserve(len(items))
        table = ffi.new("struct fp_route[]", max(len(items), 1))
        for i, (net, peer) in enumerate(items):
            table[i].prefix = int(net.network_address)
            table[i].len = net.prefixlen
            table[i].peer = int(peer)
        rc = lib.fp_set_routes(self._ctx, table, len(items))
        if rc < 0:
            _raise(rc, "set_routes")

    def add_route(self, subnet: IPv4Network, peer: IPv4Address) -> None:
        """Add a route, or point an existing one at a new peer."""
        net, addr = _network(subnet), _peer(peer)
        self._reserve(self._ctx.nroutes + 1)
        rc = lib.fp_add_route(self._ctx, int(net.network_address), net.prefixlen, int(addr))
        if rc == -errno.ENOSPC:
            raise FastPathError(errno.ENOSPC, f"route table full ({self._max_routes} routes)")
        if rc < 0:
            _raise(rc, f"add_route {net}")

    def remove_route(self, subnet: IPv4Network) -> None:
        """Remove a route; ``KeyError`` if there is none for exactly this subnet."""
        net = _network(subnet)
        rc = lib.fp_del_route(self._ctx, int(net.network_address), net.prefixlen)
        if rc == -errno.ENOENT:
            raise KeyError(net)
        if rc < 0:
            _raise(rc, f"remove_route {net}")

    def update_routes(self, removed: Iterable[IPv4Network], added: Mapping[IPv4Network, IPv4Address]) -> None:
        """Remove ``removed`` and add (or repoint) ``added`` as one change.

        Removals come first, so a subnet in both ends up added. Costs the size
        of the batch (in C and here), however large the table: a burst of
        lease changes is one call. Removing an
        absent route is not an error. Raises ``FastPathError`` (ENOSPC) if the
        result would exceed ``max_routes``, ValueError for a bad route; on any
        error the table is unchanged.
        """
        gone = [_network(net) for net in removed]
        items = [(_network(net), _peer(peer)) for net, peer in added.items()]
        dels = ffi.new("struct fp_route[]", max(len(gone), 1))
        for i, net in enumerate(gone):
            dels[i].prefix, dels[i].len = int(net.network_address), net.prefixlen
        adds = ffi.new("struct fp_route[]", max(len(items), 1))
        for i, (net, peer) in enumerate(items):
            adds[i].prefix, adds[i].len, adds[i].peer = int(net.network_address), net.prefixlen, int(peer)
        self._reserve(self._ctx.nroutes + len(items))
        rc = lib.fp_update_routes(self._ctx, dels, len(gone), adds, len(items))
        if rc == -errno.ENOSPC:
            raise FastPathError(errno.ENOSPC, f"route table full ({self._max_routes} routes)")
        if rc < 0:
            _raise(rc, "update_routes")

    def routes(self) -> dict[IPv4Network, IPv4Address]:
        """The table, longest prefixes first (then by address); O(table), for tests and tools."""
        c = self._ctx
        found = []
        for i in range(self._route_cap):
            r = c.routes[i]
            if r.peer:
                found.append((-r.len, r.prefix, r.peer))
        found.sort()
        return {IPv4Network((prefix, -neg_len)): IPv4Address(peer) for neg_len, prefix, peer in found}

    def lookup(self, addr: IPv4Address | str) -> IPv4Address | None:
        """The peer a packet to ``addr`` goes to (longest prefix match), if any."""
        peer = lib.fp_lookup(self._ctx, int(ipaddress.IPv4Address(addr)))
        return IPv4Address(peer) if peer else None

    # ---- packets ----

    def tun_to_udp(self, tun_fd: int, udp_fd: int, now_ms: int) -> int:
        """Read up to ``batch`` packets from the TUN, send them to their peers.

        Returns the number of packets read (each was sent or counted as a
        drop; a TSO packet counts once).  ``now_ms`` is a monotonic clock in
        milliseconds.  Raises ``UdpGsoDisabled`` once if the kernel refuses
        UDP_SEGMENT.
        """
        c = self._ctx
        n: int = self._tun_to_udp(c, tun_fd, udp_fd, now_ms)
        if c.gso_errno:  # set only by the call in which the kernel refused
            err, c.gso_errno = c.gso_errno, 0
            raise UdpGsoDisabled(err, n)
        if n >= 0:
            return n
        if -n in _NOTHING_TO_DO:
            return 0
        raise FastPathError(-n, f"tun_to_udp: {os.strerror(-n)}")

    def udp_to_tun(self, udp_fd: int, tun_fd: int, now_ms: int) -> int:
        """Receive up to ``batch`` datagrams, write their packets to the TUN.

        Returns the number of datagrams received (each was written or counted
        as a drop), where a UDP_GRO buffer of several datagrams counts once.
        """
        n: int = self._udp_to_tun(self._ctx, udp_fd, tun_fd, now_ms)
        if n >= 0:
            return n
        if -n in _NOTHING_TO_DO:
            return 0
        raise FastPathError(-n, f"udp_to_tun: {os.strerror(-n)}")

    # ---- counters ----

    def counters(self) -> Counters:
        """A snapshot; peers appear as long as some route points at them."""
        k = self._ctx.cnt
        raw = ffi.buffer(self._ctx.peers, self._peer_cap * _PEER.size)
        peers = {
            IPv4Address(addr): PeerCounters(txp, txb, rxp, rxb)
            for addr, _, txp, txb, rxp, rxb in _PEER.iter_unpack(raw)
            if addr
        }
        return Counters(
            tx_packets=k.tx_packets,
            tx_bytes=k.tx_bytes,
            rx_packets=k.rx_packets,
            rx_bytes=k.rx_bytes,
            drops={name: getattr(k, "drop_" + name) for name in DROP_REASONS},
            icmp_sent=k.icmp_sent,
            icmp_ratelimited=k.icmp_ratelimited,
            tx_batches=k.tx_batches,
            tx_multi_batches=k.tx_multi_batches,
            tx_max_batch=k.tx_max_batch,
            rx_batches=k.rx_batches,
            rx_multi_batches=k.rx_multi_batches,
            rx_max_batch=k.rx_max_batch,
            peers=peers,
            **{name: getattr(k, name) for name in OFFLOAD_COUNTERS},
        )

    def drops(self) -> list[Drop]:
        """The most recent dropped packets (at most ``drop_ring``), oldest first."""
        c = self._ctx
        cap, total = self._drop_ring, c.drops_total
        if not cap or not total:
            return []
        raw = bytes(ffi.buffer(c.drops, cap * _DROP.size))
        out = []
        for k in range(max(0, total - cap), total):
            time_ms, peer, length, reason, direction, count, _, data = _DROP.unpack_from(
                raw, (k % cap) * _DROP.size
            )
            out.append(
                Drop(
                    time_ms=time_ms,
                    reason=DROP_REASONS[reason] if reason < len(DROP_REASONS) else str(reason),
                    direction="rx" if direction == lib.FP_DIR_RX else "tx",
                    peer=IPv4Address(peer) if peer else None,
                    length=length,
                    count=count,
                    data=data[: min(length, DROP_SNAP)],
                )
            )
        return out

    @property
    def drops_total(self) -> int:
        """Records ever written to the drop ring (a drop of a train of datagrams is one)."""
        return int(self._ctx.drops_total)

    def __repr__(self) -> str:
        return (
            f"FastPath(mtu={self._mtu}, local_addr={self._local_addr}, port={self._port}, "
            f"batch={self._batch}, offload={self._offload}, "
            f"routes={self._ctx.nroutes}/{self._capacity} (max {self._max_routes}))"
        )
