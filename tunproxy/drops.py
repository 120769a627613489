"""``tunproxy drops``: the fast path's most recently dropped packets, decoded, or as pcapng.

The C side keeps each dropped packet's first ``DROP_SNAP`` bytes with the
reason, the direction, the peer and the time in a ring (``FastPath.drops``).
The daemon serves them over the control socket as JSON records (the bytes in
hex); this module turns them into a table with the inner headers decoded
(addresses, protocol, ports, length), or into a pcapng file (the pcapng
specification, draft-ietf-opsawg-pcapng) that tcpdump, tshark and Wireshark
open: link type LINKTYPE_IPV4 (228, the packet starts at its IPv4 header),
snap length ``DROP_SNAP``, and the reason, direction, peer and count in each
packet's comment option (opt_comment), e.g. ``reason=no_route dir=tx peer=-
count=1``; tshark shows it as ``frame.comment``.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from ipaddress import IPv4Address
from typing import Any, BinaryIO

from .counters import DROP_SNAP, Drop

PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 47: "gre", 50: "esp", 132: "sctp"}
LINKTYPE_IPV4 = 228  # tcpdump.org link-layer header types


def decode(data: bytes) -> dict[str, Any]:
    """The inner IPv4 header of (the first bytes of) a packet: src, dst, protocol, length and,
    for TCP/UDP, ports; for ICMP, type and code. ``{"error": ...}`` if it is no IPv4 packet."""
    if len(data) < 20 or data[0] >> 4 != 4 or (data[0] & 15) < 5:
        return {"error": f"not an IPv4 packet ({len(data)} bytes)"}
    ihl = (data[0] & 15) * 4
    proto = data[9]
    out: dict[str, Any] = {
        "src": str(IPv4Address(data[12:16])),
        "dst": str(IPv4Address(data[16:20])),
        "protocol": PROTOCOLS.get(proto, str(proto)),
    }
    fragment = struct.unpack_from("!H", data, 6)[0] & 0x1FFF
    if proto in (6, 17) and not fragment and len(data) >= ihl + 4:
        out["sport"], out["dport"] = struct.unpack_from("!HH", data, ihl)
    elif proto == 1 and not fragment and len(data) >= ihl + 2:
        out["icmp_type"], out["icmp_code"] = data[ihl], data[ihl + 1]
    out["length"] = struct.unpack_from("!H", data, 2)[0]
    return out


def drop_records(drops: Iterable[Drop], now_ms: int, wall: float) -> list[dict[str, Any]]:
    """``FastPath.drops()`` as JSON-able records; ``now_ms`` is the fast path's clock now
    (monotonic milliseconds) and ``wall`` the Unix time now, to date each drop."""
    out = []
    for d in drops:
        age = max(0, now_ms - d.time_ms) / 1000
        out.append(
            {
                "time": wall - age,
                "age_seconds": age,
                "reason": d.reason,
                "direction": d.direction,
                "peer": str(d.peer) if d.peer else None,
                "length": d.length,
                "count": d.count,
                "data": d.data.hex(),
                "packet": decode(d.data),
            }
        )
    return out


def drop_document(ring: tuple[int, list[Drop]] | None, now: float, wall: float) -> dict[str, Any]:
    """What the control socket answers to ``drops``, from ``Backend.drop_ring()``: ``now`` is
    monotonic seconds (the clock the udp backend gives the fast path), ``wall`` Unix time.
    Without a fast path (vxlan, host-gw drop nothing in userspace) the list is empty."""
    if ring is None:
        return {"recorded": 0, "drops": [], "note": "this backend forwards in the kernel, not in tunproxy"}
    recorded, drops = ring
    return {"recorded": recorded, "drops": drop_records(drops, int(now * 1000), wall)}


def summary(packet: Mapping[str, Any]) -> str:
    """``udp 10.100.5.1:5000 > 10.100.77.1:53 len 60``, or the decoding error."""
    if "error" in packet:
        return str(packet["error"])
    src, dst = packet["src"], packet["dst"]
    if "sport" in packet:
        src, dst = f"{src}:{packet['sport']}", f"{dst}:{packet['dport']}"
    extra = f" type {packet['icmp_type']} code {packet['icmp_code']}" if "icmp_type" in packet else ""
    return f"{packet['protocol']} {src} > {dst}{extra} len {packet['length']}"


def format_drops(doc: Mapping[str, Any]) -> str:
    """The table ``tunproxy drops`` prints, oldest first."""
    drops: Sequence[Mapping[str, Any]] = doc.get("drops") or []
    if not drops:
        note = doc.get("note")
        return "no dropped packets recorded" + (f": {note}" if note else "")
    rows = [["TIME", "REASON", "DIR", "PEER", "PACKET"]]
    for d in drops:
        stamp = time.strftime("%H:%M:%S", time.localtime(d["time"])) + f".{int(d['time'] * 1000) % 1000:03d}"
        what = summary(d["packet"]) + (f" (x{d['count']})" if d.get("count", 1) > 1 else "")
        rows.append([stamp, d["reason"], d["direction"], d.get("peer") or "-", what])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _block(kind: int, body: bytes) -> bytes:
    length = 12 + len(body)
    return struct.pack("<II", kind, length) + body + struct.pack("<I", length)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + bytes(-len(value) % 4)


def write_pcapng(out: BinaryIO, records: Iterable[Mapping[str, Any]]) -> None:
    """Write drop records (as ``drop_records`` makes them) to ``out`` as pcapng: one section,
    one LINKTYPE_IPV4 interface with microsecond timestamps, one enhanced packet block per
    drop with its reason in an opt_comment."""
    shb = struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)
    out.write(_block(0x0A0D0D0A, shb))
    idb = struct.pack("<HHI", LINKTYPE_IPV4, 0, DROP_SNAP) + _option(2, b"tunproxy drops") + _option(0, b"")
    out.write(_block(1, idb))
    for r in records:
        data = bytes.fromhex(r["data"])
        micros = int(r["time"] * 1_000_000)
        comment = (
            f"reason={r['reason']} dir={r['direction']} peer={r.get('peer') or '-'} count={r.get('count', 1)}"
        )
        body = struct.pack(
            "<IIIII", 0, micros >> 32, micros & 0xFFFFFFFF, len(data), max(r["length"], len(data))
        )
        body += data + bytes(-len(data) % 4) + _option(1, comment.encode()) + _option(0, b"")
        out.write(_block(6, body))
