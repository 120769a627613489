"""The memory the C fast path works in, allocated with cffi (layouts: ``fastpath_c/fastpath.h``).

The C side never allocates, so everything it touches is made here, once: the
packet ring with its mmsghdr/iovec/sockaddr arrays, the route and peer tables
(each with a spare, where a change is built aside and swapped in by one C
call), the drop ring and, in offload mode, the send queue, the cmsg buffers
and the iovecs of a coalesced TUN write. Each array is exactly as long as
the context says, which is the one thing the C side must trust. cdata
assigned into a struct is not kept alive by it, so every ``wire_*`` function
returns the arrays it wired in, for the owner of the context to hold.

The ``read_*`` functions copy what Python shows out of that memory: the route
table, the peer table's counters and the drop ring's records; ``route_array``
packs routes for the route calls.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from tunproxy._fastpath_cffi import ffi, lib

from .counters import DROP_REASONS, DROP_SNAP, PEER_COUNTERS, Drop, PeerCounters

# The counters' names are the struct's fields (tunproxy.counters says what they mean).
COUNTER_FIELDS: tuple[str, ...] = tuple(name for name, _ in ffi.typeof("struct fp_counters").fields)
assert [getattr(lib, "FP_DROP_" + r.upper()) for r in DROP_REASONS] == list(range(len(DROP_REASONS)))
PEER = struct.Struct("=II4Q")  # struct fp_peer
assert PEER.size == ffi.sizeof("struct fp_peer")
assert tuple(name for name, _ in ffi.typeof("struct fp_peer").fields[2:]) == PEER_COUNTERS
DROP = struct.Struct(f"=QIIBBHI{DROP_SNAP}s")  # struct fp_drop
if lib.FP_DROP_SNAP != DROP_SNAP:  # a rebuilt extension with another snap length: refuse to misread
    raise ImportError(f"counters.DROP_SNAP {DROP_SNAP} is not fastpath.h's FP_DROP_SNAP {lib.FP_DROP_SNAP}")
assert DROP.size == ffi.sizeof("struct fp_drop")

Arrays = dict[str, Any]


def slots(routes: int, factor: int) -> int:
    """Slots of a hash table for ``routes`` entries: a power of two, at least ``factor`` times as many.

    Routes use 2 (never more than half full); peers 4, since during a batch
    the peers of routes being removed and of routes being added coexist.
    """
    return 1 << (factor * routes - 1).bit_length()


def new_tables(capacity: int) -> tuple[int, int, Arrays]:
    """Route and peer tables, live and spare, for ``capacity`` routes: (route slots, peer slots, arrays)."""
    route_cap, peer_cap = slots(capacity, 2), slots(capacity, 4)
    arrays = {
        "routes": ffi.new("struct fp_route[]", route_cap),
        "routes_alt": ffi.new("struct fp_route[]", route_cap),
        "peers": ffi.new("struct fp_peer[]", peer_cap),
        "peers_alt": ffi.new("struct fp_peer[]", peer_cap),
    }
    return route_cap, peer_cap, arrays


def wire_tables(c: Any, capacity: int) -> Arrays:
    """Fresh tables for ``capacity`` routes set in context ``c`` (before ``fp_init``, which clears them)."""
    route_cap, peer_cap, arrays = new_tables(capacity)
    c.max_routes, c.route_cap, c.peer_cap = capacity, route_cap, peer_cap
    c.routes, c.routes_alt = arrays["routes"], arrays["routes_alt"]
    c.peers, c.peers_alt = arrays["peers"], arrays["peers_alt"]
    return arrays


def wire_ring(c: Any, batch: int, slot_size: int, headroom: int, drop_ring: int) -> Arrays:
    """The packet ring (``batch`` slots of ``slot_size`` bytes) and a drop ring of ``drop_ring`` records."""
    # The slots need no clearing; leaving them untouched keeps them unbacked.
    raw = ffi.new_allocator(should_clear_after_alloc=False)
    arrays = {
        "data": raw("uint8_t[]", batch * slot_size),
        "len": ffi.new("uint32_t[]", batch),
        "addr": ffi.new("struct sockaddr_in[]", batch),
        "iov": ffi.new("struct iovec[]", batch),
        "msg": ffi.new("struct mmsghdr[]", batch),
        "drops": ffi.new("struct fp_drop[]", max(drop_ring, 1)),
    }
    ring = c.ring
    ring.data, ring.len, ring.addr = arrays["data"], arrays["len"], arrays["addr"]
    ring.iov, ring.msg = arrays["iov"], arrays["msg"]
    ring.nslots, ring.slot_size, ring.headroom = batch, slot_size, headroom
    c.drops, c.ndrops = arrays["drops"], drop_ring
    return arrays


def wire_gso(c: Any, batch: int, gso_buffer: int) -> Arrays:
    """Offload mode's send queue (``gso_buffer`` bytes of datagrams) and cmsg/iovec space."""
    # A 64 KiB TSO packet fills one or two messages, anything else at most one;
    # a queue that fills up anyway is just sent early.
    nmsg = 2 * batch + 16
    words = lib.FP_CMSG_WORDS
    raw = ffi.new_allocator(should_clear_after_alloc=False)
    arrays = {
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
    g, m = c.gso, arrays
    g.out, g.msg, g.iov, g.addr = m["out"], m["gso_msg"], m["gso_iov"], m["gso_addr"]
    g.segs, g.seg_size, g.cmsg, g.rx_cmsg = m["segs"], m["seg_size"], m["cmsg"], m["rx_cmsg"]
    g.tun_iov = m["tun_iov"]
    g.out_size = gso_buffer
    g.nmsg = nmsg
    return arrays


def route_array(routes: Sequence[tuple[IPv4Network, IPv4Address | None]]) -> Any:
    """``struct fp_route[]`` for the route calls (at least one slot; a None peer is 0)."""
    table = ffi.new("struct fp_route[]", max(len(routes), 1))
    for i, (net, peer) in enumerate(routes):
        table[i].prefix, table[i].len = int(net.network_address), net.prefixlen
        table[i].peer = int(peer) if peer is not None else 0
    return table


def read_routes(c: Any, route_cap: int) -> dict[IPv4Network, IPv4Address]:
    """The live route table, longest prefixes first (then by address); O(route_cap)."""
    found = sorted((-r.len, r.prefix, r.peer) for r in (c.routes[i] for i in range(route_cap)) if r.peer)
    return {IPv4Network((prefix, -neg_len)): IPv4Address(peer) for neg_len, prefix, peer in found}


def read_peers(c: Any, peer_cap: int) -> dict[IPv4Address, PeerCounters]:
    """The live peer table's counters, by peer; one copy of the table, O(peer_cap)."""
    raw = ffi.buffer(c.peers, peer_cap * PEER.size)
    return {IPv4Address(addr): PeerCounters(*values) for addr, _, *values in PEER.iter_unpack(raw) if addr}


def read_drops(c: Any, cap: int) -> list[Drop]:
    """The drop ring's records (``cap`` of them at most), oldest first."""
    total = c.drops_total
    if not cap or not total:
        return []
    raw = bytes(ffi.buffer(c.drops, cap * DROP.size))
    out = []
    for k in range(max(0, total - cap), total):
        record = DROP.unpack_from(raw, (k % cap) * DROP.size)
        time_ms, peer, length, reason, direction, count, _, data = record
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
