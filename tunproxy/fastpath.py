"""Python face of the C fast path of the udp backend (``tunproxy/fastpath_c/``).

``FastPath`` allocates, once, all the memory the C side works in (with
``fastpath_memory``): the context (configuration, token bucket, counters),
the packet ring with its mmsghdr/iovec/sockaddr arrays, two route tables and
two peer tables (the spare ones let a route change be built aside and
swapped in by one C call).  After
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
allocated here too, once.  With ``uso=True`` as well (the TUN took
TUN_F_USO4|TUN_F_USO6), UDP trains read from the TUN are cut into their
datagrams, and runs of one flow's received UDP datagrams are written to the
TUN as one USO train.

Arguments are checked here first, so a bad one is a ``TypeError`` or
``ValueError`` naming it. The C side checks them again (``fp_init`` the
configuration, the route calls every route: -EINVAL, -ENOSPC, -ENOENT come
back as ``FastPathError`` or ``KeyError``), and trusts nothing in a packet or
a virtio_net_hdr; what it must trust is that each array it is handed is as
long as the configuration says, which this module makes so.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import time
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network

from tunproxy._fastpath_cffi import ffi, lib

from . import fastpath_memory as memory
from .backend_config import (
    BATCH_DEFAULT,
    BATCH_MAX,
    DROP_RING_DEFAULT,
    DROP_RING_MAX,
    MAX_ROUTES,
    UDP_DEFAULT_PORT,
)
from .counters import Counters
from .fastpath_memory import COUNTER_FIELDS, Drop
from .model import can_be_public_ip

MAX_PACKET = lib.FP_MAX_PACKET
MAX_HEADROOM = 4096
INITIAL_ROUTES = 256
MAX_ICMP_RATE = 1_000_000
VNET_HDR_LEN = lib.FP_VNET_HDR_LEN
UDP_SEGMENT = 103  # linux/udp.h socket options at level SOL_UDP (not in Python's socket module)
UDP_GRO = 104
GSO_BUFFER = 1 << 20  # default bytes of copied datagrams queued before a sendmmsg
_NOTHING_TO_DO = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR)


RUN_STOP, RUN_YIELD, RUN_TUN_GONE = lib.FP_RUN_STOP, lib.FP_RUN_YIELD, lib.FP_RUN_TUN_GONE
"""What ``FastPath.run`` returns (fastpath.h's FP_RUN_*)."""


def now_ms() -> int:
    """The monotonic clock in milliseconds, the fast path's time (its ICMP rate limit, drop timestamps)."""
    return time.monotonic_ns() // 1_000_000


class FastPathError(OSError):
    """A system call in the fast path failed, or the C side refused a request."""


class UdpGsoDisabled(FastPathError):
    """The kernel refused UDP_SEGMENT (``errno`` says how); the fast path now sends
    one datagram per message for good.  Raised once, by the ``tun_to_udp``,
    ``udp_to_tun`` (its drain sends) or ``run`` call in which it happened; those
    datagrams were still sent, and ``count`` is what that call would have
    returned (0 for ``run``).  The caller should log it and carry on."""

    def __init__(self, err: int, count: int) -> None:
        super().__init__(err, f"UDP GSO disabled, sending datagrams one by one: {os.strerror(err)}")
        self.count = count


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
    if not can_be_public_ip(peer):  # the model refuses such leases; checked again at the C boundary
        raise ValueError(f"peer {peer} is not a unicast address")
    return peer


def _raise(rc: int, what: str) -> None:
    raise FastPathError(-rc, f"{what}: {os.strerror(-rc)}")


class FastPath:
    """The per-packet engine of the udp backend; single-threaded, not reentrant.

    ``mtu`` is the largest inner packet sent with DF set (bigger ones get an
    ICMP "fragmentation needed"); ``local_addr`` is the tunnel's own address,
    the source of the ICMP errors; every peer listens on UDP ``port``. A
    datagram is known by its source address alone, whatever its source port
    (a NATed peer or socat may send from another); one from an address that
    is no peer's is dropped as ``unknown_peer``.
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
    ``uso`` (offload mode only) says the TUN accepted TUN_F_USO4|TUN_F_USO6
    (kernel 6.2+), so UDP trains come in and may be written back.
    ``fast_csum`` (offload mode only; tunproxy's ``--without fast-csum``)
    picks the checksum code: AVX2 where the CPU has it, summing each TSO
    payload as it is copied, rather than the scalar sum after the copy; the
    bytes on the wire are the same. ``simd`` False keeps it off AVX2 even
    where the CPU has it (the portable code; ``--refuse fast-csum``).
    ``drain`` (tunproxy's ``drain``, on unless ``--without drain``): each
    ``udp_to_tun`` reads the TUN after its writes and sends the replies the
    kernel made in them (ACKs, echo replies), rather than after another
    wake-up; while it finds none it reads only once in 64 calls
    (fastpath.h's FP_REPLY_* rule).
    """

    def __init__(
        self,
        *,
        mtu: int,
        local_addr: IPv4Address | str,
        port: int = UDP_DEFAULT_PORT,
        batch: int = BATCH_DEFAULT,
        headroom: int = 64,
        max_routes: int = 65536,
        icmp_rate: int = 100,
        icmp_burst: int = 50,
        slot_size: int | None = None,
        offload: bool = False,
        udp_gso: bool = True,
        uso: bool = False,
        gso_buffer: int = GSO_BUFFER,
        drop_ring: int = DROP_RING_DEFAULT,
        allow_any_source: bool = False,
        fast_csum: bool = True,
        simd: bool = True,
        drain: bool = False,
    ) -> None:
        _check_int("mtu", mtu, 68, MAX_PACKET)
        _check_int("port", port, 1, 65535)
        _check_int("batch", batch, 1, BATCH_MAX)
        _check_int("headroom", headroom, 0, MAX_HEADROOM)
        _check_int("max_routes", max_routes, 1, MAX_ROUTES)
        _check_int("icmp_rate", icmp_rate, 0, MAX_ICMP_RATE)
        _check_int("icmp_burst", icmp_burst, 0, MAX_ICMP_RATE)
        _check_int("gso_buffer", gso_buffer, MAX_PACKET, 1 << 30)
        _check_int("drop_ring", drop_ring, 0, DROP_RING_MAX)
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
        self._capacity = min(max_routes, INITIAL_ROUTES)

        c = self._ctx = ffi.new("struct fp_ctx *")
        c.mtu = mtu
        c.local_addr = int(local)
        c.port = port
        c.batch = batch
        c.icmp_rate = icmp_rate
        c.icmp_burst = icmp_burst
        c.allow_any_source = bool(allow_any_source)
        if offload:
            c.offload = lib.FP_OFFLOAD_VNET | (lib.FP_OFFLOAD_UDP_GSO if udp_gso else 0)
            c.offload |= lib.FP_OFFLOAD_USO if uso else 0
            c.features = lib.FP_FEAT_FAST_CSUM if fast_csum else 0
            c.features |= 0 if simd else lib.FP_FEAT_CSUM_NO_SIMD
        c.features |= lib.FP_FEAT_DRAIN if drain else 0
        self._offload = bool(offload)
        # The arrays the context points into; held here, as it does not keep them alive.
        self._memory = memory.wire_tables(c, self._capacity)
        self._memory |= memory.wire_ring(c, batch, slot_size, headroom, drop_ring)
        self._route_cap, self._peer_cap = c.route_cap, c.peer_cap
        self._drop_ring = drop_ring
        if offload:
            self._memory |= memory.wire_gso(c, batch, gso_buffer)
        rc = lib.fp_init(c)
        if rc < 0:
            _raise(rc, "fp_init")
        self._tun_to_udp = lib.fp_tun_to_udp
        self._run = lib.fp_run
        self._udp_to_tun = lib.fp_udp_to_tun

    @property
    def offload(self) -> bool:
        """Whether the TUN has a virtio-net header (TSO4 and checksum offload)."""
        return self._offload

    @property
    def fast_csum(self) -> bool:
        """Whether offload mode uses the fast checksum code (``fast-csum``)."""
        return bool(self._ctx.features & lib.FP_FEAT_FAST_CSUM)

    @property
    def csum_simd(self) -> bool:
        """Whether fast-csum runs the AVX2 code: asked for, and the CPU has it."""
        k = self._ctx.features
        return bool(k & lib.FP_FEAT_FAST_CSUM and not k & lib.FP_FEAT_CSUM_NO_SIMD and lib.fp_have_avx2())

    @property
    def udp_gso(self) -> bool:
        """Whether runs of datagrams still go out with UDP_SEGMENT (the kernel may refuse)."""
        return bool(self._ctx.offload & lib.FP_OFFLOAD_UDP_GSO)

    @property
    def uso(self) -> bool:
        """Whether UDP trains (USO) are read from and written to the TUN."""
        return bool(self._ctx.offload & lib.FP_OFFLOAD_USO)

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
        route_cap, peer_cap, fresh = memory.new_tables(capacity)
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
        rc = lib.fp_set_routes(self._ctx, memory.route_array(items), len(items))
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
        gone = [(_network(net), None) for net in removed]
        items = [(_network(net), _peer(peer)) for net, peer in added.items()]
        dels, adds = memory.route_array(gone), memory.route_array(items)
        self._reserve(self._ctx.nroutes + len(items))
        rc = lib.fp_update_routes(self._ctx, dels, len(gone), adds, len(items))
        if rc == -errno.ENOSPC:
            raise FastPathError(errno.ENOSPC, f"route table full ({self._max_routes} routes)")
        if rc < 0:
            _raise(rc, "update_routes")

    def routes(self) -> dict[IPv4Network, IPv4Address]:
        """The table, longest prefixes first (then by address); O(table), for tests and tools."""
        return memory.read_routes(self._ctx, self._route_cap)

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
        return self._result(self._tun_to_udp(self._ctx, tun_fd, udp_fd, now_ms), "tun_to_udp")

    def udp_to_tun(self, udp_fd: int, tun_fd: int, now_ms: int) -> int:
        """Receive up to ``batch`` datagrams, write their packets to the TUN.

        Returns the number of datagrams received (each was written or counted
        as a drop), where a UDP_GRO buffer of several datagrams counts once.
        With ``drain``, the replies it then sends may meet the kernel's
        refusal of UDP_SEGMENT: ``UdpGsoDisabled`` once, as ``tun_to_udp``.
        """
        return self._result(self._udp_to_tun(self._ctx, udp_fd, tun_fd, now_ms), "udp_to_tun")

    def _result(self, n: int, what: str) -> int:
        """A packet call's count; 0 for nothing to do; UdpGsoDisabled or FastPathError."""
        self._check_gso(max(n, 0))
        if n >= 0:
            return n
        if -n in _NOTHING_TO_DO:
            return 0
        raise FastPathError(-n, f"{what}: {os.strerror(-n)}")

    def run(self, epfd: int, tun_fd: int, udp_fd: int, stop_fd: int, yield_fd: int) -> int:
        """Forward both ways in C until ``stop_fd`` or ``yield_fd`` is readable (the "c-loop").

        ``epfd`` is an epoll fd watching the four fds for EPOLLIN. The C waits
        in epoll_wait and calls the two directions itself (the GIL released
        all the while), so a wake-up costs no Python. Returns ``RUN_STOP``
        (stop_fd left readable), ``RUN_YIELD`` (yield_fd read: someone wants
        this fast path's lock) or ``RUN_TUN_GONE`` (the TUN says EBADFD: its
        device was deleted). Raises ``UdpGsoDisabled`` once if the kernel
        refused UDP_SEGMENT, and ``FastPathError`` if a call failed; either
        way, call it again.
        """
        r: int = self._run(self._ctx, epfd, tun_fd, udp_fd, stop_fd, yield_fd)
        self._check_gso(0)  # FP_RUN_GSO_REFUSED: the loop came back to say it
        if r < 0:
            raise FastPathError(-r, f"run: {os.strerror(-r)}")
        return r

    def _check_gso(self, count: int) -> None:
        """UdpGsoDisabled (with ``count``) if the call just made found UDP_SEGMENT refused."""
        c = self._ctx
        if c.gso_errno:  # set only by the call in which the kernel refused
            err, c.gso_errno = c.gso_errno, 0
            raise UdpGsoDisabled(err, count)

    # ---- counters ----

    def counters(self) -> Counters:
        """A snapshot; peers appear as long as some route points at them."""
        k = self._ctx.cnt
        peers = memory.read_peers(self._ctx, self._peer_cap)
        return Counters({name: getattr(k, name) for name in COUNTER_FIELDS}, peers)

    def drops(self) -> list[Drop]:
        """The most recent dropped packets (at most ``drop_ring``), oldest first."""
        return memory.read_drops(self._ctx, self._drop_ring)

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
