"""IPv4 header arithmetic in pure Python: the reference twin of the C fast path (``tunproxy/fastpath_c/``).

Every rule the C fast path applies per packet is written here once more, slowly
and plainly, so tests can compare the two byte for byte:

* ``parse_ipv4`` accepts exactly the packets the C accepts (version 4, IHL >= 5,
  header inside the packet, IHL*4 <= total length <= bytes read, header
  checksum correct); bytes past the total length are ignored.
* ``forward`` is the C rewrite: trim to the total length, TTL - 1, checksum
  patched incrementally (RFC 1624 eqn. 3, which never yields the 0xFFFF form).
* ``icmp_error`` builds the errors the C sends: source = the tunnel's local
  address, TTL 64, IP ID 0, no flags, quoting the offending header plus 8 bytes
  (RFC 792); ``icmp_error_due`` says when one may be sent at all (RFC 1812
  4.3.2.7).

Offload mode adds the work the kernel leaves to a TUN reader with
IFF_VNET_HDR and TSO (``offload_forward``):

* ``complete_checksum`` fills in a partial TCP/UDP checksum as the kernel's
  ``skb_checksum_help`` does: the field holds the pseudo-header sum, the sum
  runs from ``csum_start`` to the end, and 0 is written as 0xFFFF.
* ``tso_split`` cuts a TSO super-packet as ``tcp_gso_segment`` does: ``mss``
  payload bytes per packet, total length set, IP ID + 1 and sequence number +
  mss per packet, FIN and PSH kept only on the last packet and CWR only on the
  first, IP header checksum recomputed and the TCP checksum completed.

With USO on the TUN (TUN_F_USO4|TUN_F_USO6) it also takes UDP trains:

* ``uso_split`` cuts a UDP train (VIRTIO_NET_HDR_GSO_UDP_L4) as
  ``__udp_gso_segment`` does: ``size`` payload bytes per datagram, IP ID + 1,
  total length, IP header checksum, UDP length and UDP checksum computed
  afresh (a train without a checksum keeps none).
* ``uso_coalesce`` is the receive side: the TUN writes the fast path makes of
  one peer's received packets, runs of one UDP flow merged into one USO write
  (wireguard-go's UDP GRO rules).

It also builds packets for tests (``build_ipv4``, ``build_tcp``).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

IPV4_MIN_HEADER = 20
PROTO_ICMP = 1

FLAG_DF = 0x4000
FLAG_MF = 0x2000
FRAG_OFFSET_MASK = 0x1FFF

ICMP_DEST_UNREACH = 3
ICMP_SOURCE_QUENCH = 4
ICMP_REDIRECT = 5
ICMP_TIME_EXCEEDED = 11
ICMP_PARAM_PROBLEM = 12
ICMP_ERROR_TYPES = frozenset(
    {ICMP_DEST_UNREACH, ICMP_SOURCE_QUENCH, ICMP_REDIRECT, ICMP_TIME_EXCEEDED, ICMP_PARAM_PROBLEM}
)
CODE_NET_UNREACH = 0
CODE_FRAG_NEEDED = 4
CODE_TTL_EXCEEDED = 0

ICMP_ERROR_TTL = 64

PROTO_TCP = 6
TCP_FIN = 0x01
TCP_PSH = 0x08
TCP_CWR = 0x80

# struct virtio_net_hdr (linux/virtio_net.h): in host byte order on a TUN.
VNET_HDR = struct.Struct("=BBHHHH")
VNET_F_NEEDS_CSUM = 1
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP_L4 = 5
GSO_ECN = 0x80
PROTO_UDP = 17
USO_MAX_SEGS = 64

Address = ipaddress.IPv4Address | str | int


class MalformedPacket(ValueError):
    """The bytes are not an IPv4 packet the fast path would forward."""


def checksum(data: bytes | bytearray | memoryview) -> int:
    """RFC 1071 internet checksum (odd lengths are padded with a zero byte)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def incremental_update(hc: int, old: int, new: int) -> int:
    """RFC 1624 eqn. 3: the checksum after one 16-bit word changes old -> new."""
    total = (~hc & 0xFFFF) + (~old & 0xFFFF) + new
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@dataclass(frozen=True)
class IPv4Header:
    """A parsed IPv4 header (addresses as ``IPv4Address``)."""

    ihl: int  # in 32-bit words
    tos: int
    total_length: int
    ident: int
    flags_frag: int  # the raw flags + fragment offset word
    ttl: int
    proto: int
    checksum: int
    src: ipaddress.IPv4Address
    dst: ipaddress.IPv4Address
    options: bytes

    @property
    def header_length(self) -> int:
        return self.ihl * 4

    @property
    def dont_fragment(self) -> bool:
        return bool(self.flags_frag & FLAG_DF)

    @property
    def frag_offset(self) -> int:
        return self.flags_frag & FRAG_OFFSET_MASK


def parse_ipv4(packet: bytes | bytearray) -> IPv4Header:
    """Parse and validate like the fast path does; raise ``MalformedPacket``."""
    n = len(packet)
    if n < IPV4_MIN_HEADER:
        raise MalformedPacket(f"{n} bytes is shorter than an IPv4 header")
    if packet[0] >> 4 != 4:
        raise MalformedPacket(f"IP version {packet[0] >> 4}, not 4")
    hlen = (packet[0] & 15) * 4
    total = int.from_bytes(packet[2:4], "big")
    if hlen < IPV4_MIN_HEADER or hlen > n:
        raise MalformedPacket(f"header length {hlen} does not fit in {n} bytes")
    if total < hlen or total > n:
        raise MalformedPacket(f"total length {total} is not within {hlen}..{n}")
    if checksum(packet[:hlen]) != 0:
        raise MalformedPacket("bad header checksum")
    tos, _, ident, flags_frag, ttl, proto, csum = struct.unpack("!BHHHBBH", packet[1:12])
    return IPv4Header(
        ihl=hlen // 4,
        tos=tos,
        total_length=total,
        ident=ident,
        flags_frag=flags_frag,
        ttl=ttl,
        proto=proto,
        checksum=csum,
        src=ipaddress.IPv4Address(packet[12:16]),
        dst=ipaddress.IPv4Address(packet[16:20]),
        options=bytes(packet[20:hlen]),
    )


def build_ipv4(
    *,
    src: Address,
    dst: Address,
    payload: bytes = b"",
    proto: int = 17,
    ttl: int = 64,
    ident: int = 0,
    tos: int = 0,
    df: bool = False,
    mf: bool = False,
    frag_offset: int = 0,
    options: bytes = b"",
    total_length: int | None = None,
    csum: int | None = None,
) -> bytes:
    """An IPv4 packet; the checksum is computed unless ``csum`` is given."""
    if len(options) % 4 or len(options) > 40:
        raise ValueError("options must be a multiple of 4 bytes, at most 40")
    hlen = IPV4_MIN_HEADER + len(options)
    total = hlen + len(payload) if total_length is None else total_length
    flags = (FLAG_DF if df else 0) | (FLAG_MF if mf else 0) | frag_offset
    header = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | hlen // 4,
            tos,
            total,
            ident,
            flags,
            ttl,
            proto,
            0,
            ipaddress.IPv4Address(src).packed,
            ipaddress.IPv4Address(dst).packed,
        )
        + options
    )
    header[10:12] = (checksum(header) if csum is None else csum).to_bytes(2, "big")
    return bytes(header) + payload


def decrement_ttl(packet: bytes) -> bytes:
    """TTL - 1 with the incremental checksum update (TTL must be >= 1)."""
    if packet[8] < 1:
        raise ValueError("TTL is already 0")
    out = bytearray(packet)
    old = int.from_bytes(out[8:10], "big")
    out[8] -= 1
    new = int.from_bytes(out[8:10], "big")
    hc = int.from_bytes(out[10:12], "big")
    out[10:12] = incremental_update(hc, old, new).to_bytes(2, "big")
    return bytes(out)


def forward(packet: bytes) -> bytes:
    """What the fast path sends on for ``packet``: trimmed, TTL - 1."""
    header = parse_ipv4(packet)
    return decrement_ttl(packet[: header.total_length])


def icmp_error_due(packet: bytes) -> bool:
    """Whether an ICMP error may be sent about this (valid) packet at all."""
    header = parse_ipv4(packet)
    if header.frag_offset or int(header.src) == 0:
        return False
    # 224.0.0.0 and up: multicast, class E and the limited broadcast.
    if int(header.src) >= 0xE0000000 or int(header.dst) >= 0xE0000000:
        return False
    if header.proto == PROTO_ICMP:
        hlen = header.header_length
        return header.total_length > hlen and packet[hlen] not in ICMP_ERROR_TYPES
    return True


def icmp_error(packet: bytes, *, src: Address, icmp_type: int, code: int, mtu: int = 0) -> bytes:
    """The ICMP error about ``packet``, from ``src`` back to its sender."""
    header = parse_ipv4(packet)
    quote = packet[: min(header.header_length + 8, header.total_length)]
    body = struct.pack("!BBHHH", icmp_type, code, 0, 0, mtu) + quote
    body = body[:2] + checksum(body).to_bytes(2, "big") + body[4:]
    return build_ipv4(src=src, dst=header.src, payload=body, proto=PROTO_ICMP, ttl=ICMP_ERROR_TTL)


def icmp_net_unreachable(packet: bytes, src: Address) -> bytes:
    return icmp_error(packet, src=src, icmp_type=ICMP_DEST_UNREACH, code=CODE_NET_UNREACH)


def icmp_time_exceeded(packet: bytes, src: Address) -> bytes:
    return icmp_error(packet, src=src, icmp_type=ICMP_TIME_EXCEEDED, code=CODE_TTL_EXCEEDED)


def icmp_frag_needed(packet: bytes, src: Address, mtu: int) -> bytes:
    return icmp_error(packet, src=src, icmp_type=ICMP_DEST_UNREACH, code=CODE_FRAG_NEEDED, mtu=mtu)


# ---- offload mode: TSO and partial checksums ----


@dataclass(frozen=True)
class VnetHdr:
    """The virtio_net_hdr before each packet on a TUN opened with IFF_VNET_HDR."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0  # the kernel's, not trusted: the headers are parsed instead
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    def pack(self) -> bytes:
        return VNET_HDR.pack(
            self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start, self.csum_offset
        )

    @classmethod
    def unpack(cls, data: bytes) -> VnetHdr:
        return cls(*VNET_HDR.unpack(data[: VNET_HDR.size]))


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def pseudo_header_sum(packet: bytes | bytearray, l4_length: int) -> int:
    """The folded (not complemented) TCP/UDP pseudo-header sum of an IPv4 packet:
    what the kernel leaves in the checksum field of a partial checksum."""
    return _fold(sum(struct.unpack("!4H", packet[12:20])) + packet[9] + l4_length)


def complete_checksum(packet: bytes, csum_start: int, csum_offset: int) -> bytes:
    """Fill in a partial checksum (VIRTIO_NET_HDR_F_NEEDS_CSUM) like skb_checksum_help."""
    out = bytearray(packet)
    at = csum_start + csum_offset
    out[at : at + 2] = (checksum(out[csum_start:]) or 0xFFFF).to_bytes(2, "big")
    return bytes(out)


def l4_checksum_ok(packet: bytes) -> bool:
    """Whether a TCP/UDP packet's checksum verifies (RFC 793 pseudo-header, from scratch)."""
    header = parse_ipv4(packet)
    segment = packet[header.header_length : header.total_length]
    pseudo = packet[12:20] + bytes([0, header.proto]) + len(segment).to_bytes(2, "big")
    return checksum(pseudo + segment) == 0


def tcp_header_length(packet: bytes) -> int:
    ihl = (packet[0] & 15) * 4
    return (packet[ihl + 12] >> 4) * 4


def tso_split(packet: bytes, mss: int) -> list[bytes]:
    """The packets tcp_gso_segment makes of a TSO super-packet (see the module docstring)."""
    ihl = (packet[0] & 15) * 4
    hlen = ihl + tcp_header_length(packet)
    total = int.from_bytes(packet[2:4], "big")
    payload = packet[hlen:total]
    chunks = [payload[i : i + mss] for i in range(0, len(payload), mss)] or [b""]
    ident = int.from_bytes(packet[4:6], "big")
    seq = int.from_bytes(packet[ihl + 4 : ihl + 8], "big")
    out = []
    for n, chunk in enumerate(chunks):
        seg = bytearray(packet[:hlen] + chunk)
        seg[2:4] = len(seg).to_bytes(2, "big")
        seg[4:6] = ((ident + n) & 0xFFFF).to_bytes(2, "big")
        seg[10:12] = b"\0\0"
        seg[10:12] = checksum(seg[:ihl]).to_bytes(2, "big")
        seg[ihl + 4 : ihl + 8] = ((seq + n * mss) & 0xFFFFFFFF).to_bytes(4, "big")
        if n < len(chunks) - 1:
            seg[ihl + 13] &= ~(TCP_FIN | TCP_PSH) & 0xFF
        if n:
            seg[ihl + 13] &= ~TCP_CWR & 0xFF
        seg[ihl + 16 : ihl + 18] = pseudo_header_sum(seg, len(seg) - ihl).to_bytes(2, "big")
        out.append(complete_checksum(bytes(seg), ihl, 16))
    return out


def uso_split(packet: bytes, size: int, *, no_checksum: bool = False) -> list[bytes]:
    """The datagrams __udp_gso_segment makes of a UDP train (see the module docstring)."""
    ihl = (packet[0] & 15) * 4
    hlen = ihl + 8
    total = int.from_bytes(packet[2:4], "big")
    payload = packet[hlen:total]
    chunks = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
    ident = int.from_bytes(packet[4:6], "big")
    out = []
    for n, chunk in enumerate(chunks):
        seg = bytearray(packet[:hlen] + chunk)
        seg[2:4] = len(seg).to_bytes(2, "big")
        seg[4:6] = ((ident + n) & 0xFFFF).to_bytes(2, "big")
        seg[10:12] = b"\0\0"
        seg[10:12] = checksum(seg[:ihl]).to_bytes(2, "big")
        seg[ihl + 4 : ihl + 6] = (len(seg) - ihl).to_bytes(2, "big")
        if not no_checksum:
            seg[ihl + 6 : ihl + 8] = pseudo_header_sum(seg, len(seg) - ihl).to_bytes(2, "big")
            seg = bytearray(complete_checksum(bytes(seg), ihl, 6))
        out.append(bytes(seg))
    return out


def uso_candidate(packet: bytes) -> bool:
    """Whether a received (forwarded) packet may join a USO write: UDP, no IP
    options or fragments, some payload, the UDP length the packet's, and a
    checksum present and right."""
    total = len(packet)
    return (
        packet[0] == 0x45
        and packet[9] == PROTO_UDP
        and not int.from_bytes(packet[6:8], "big") & (FLAG_MF | FRAG_OFFSET_MASK)
        and total > 28
        and int.from_bytes(packet[24:26], "big") == total - 20
        and packet[26:28] != b"\0\0"
        and l4_checksum_ok(packet)
    )


def uso_coalesce(packets: list[bytes]) -> list[tuple[VnetHdr, bytes]]:
    """The TUN writes the fast path makes, with USO on, of one peer's received
    packets (already forwarded: TTL - 1), in order; for UDP and anything that
    is not TCP (whose coalescing this twin does not model).  A run of one UDP
    flow (the same IP header but for length, ID and checksum, the same ports,
    payloads no bigger than the first and nothing after a shorter one, at
    most 64 datagrams and 65535 bytes) becomes one write, its first datagram's
    headers made the train's, the UDP checksum left partial."""
    writes: list[tuple[VnetHdr, bytes]] = []
    run: list[bytes] = []

    def flush() -> None:
        if len(run) == 1:
            writes.append((VnetHdr(), run[0]))
        elif run:
            body = run[0] + b"".join(p[28:] for p in run[1:])
            head = bytearray(body[:28])
            head[2:4] = len(body).to_bytes(2, "big")
            head[10:12] = b"\0\0"
            head[10:12] = checksum(head[:20]).to_bytes(2, "big")
            head[24:26] = (len(body) - 20).to_bytes(2, "big")
            head[26:28] = pseudo_header_sum(head, len(body) - 20).to_bytes(2, "big")
            vnet = VnetHdr(VNET_F_NEEDS_CSUM, GSO_UDP_L4, 28, len(run[0]) - 28, 20, 6)
            writes.append((vnet, bytes(head) + body[28:]))
        run.clear()

    for p in packets:
        if not uso_candidate(p):
            flush()
            writes.append((VnetHdr(), p))
            continue
        if run:
            first, mss = run[0], len(run[0]) - 28
            follows = (
                len(run) < USO_MAX_SEGS
                and len(run[-1]) - 28 == mss
                and len(p) - 28 <= mss
                and sum(len(q) - 28 for q in run) + 28 + len(p) - 28 <= 65535
                and p[0:2] == first[0:2]
                and p[6:10] == first[6:10]
                and p[12:24] == first[12:24]
            )
            if not follows:
                flush()
        run.append(p)
    flush()
    return writes


def offload_forward(vnet: VnetHdr, packet: bytes, *, uso: bool = False) -> list[bytes]:
    """What the fast path sends, one packet per datagram, for one TUN read in
    offload mode (``uso``: the TUN took USO); ``MalformedPacket`` if it drops
    the read as malformed."""
    header = parse_ipv4(packet)
    ihl, total = header.header_length, header.total_length
    packet = packet[:total]
    if vnet.gso_type == GSO_UDP_L4:
        if (
            not uso
            or header.proto != PROTO_UDP
            or not vnet.gso_size
            or header.flags_frag & (FLAG_MF | FRAG_OFFSET_MASK)
            or ihl + 8 > total
        ):
            raise MalformedPacket(f"not a UDP train we can cut: {vnet}")
        no_checksum = not vnet.flags & VNET_F_NEEDS_CSUM and packet[ihl + 6 : ihl + 8] == b"\0\0"
        return uso_split(decrement_ttl(packet), vnet.gso_size, no_checksum=no_checksum)
    if vnet.gso_type != GSO_NONE:
        if (
            vnet.gso_type & ~GSO_ECN != GSO_TCPV4
            or header.proto != PROTO_TCP
            or not vnet.gso_size
            or header.flags_frag & (FLAG_MF | FRAG_OFFSET_MASK)
            or ihl + 20 > total
        ):
            raise MalformedPacket(f"not a TSO packet we can cut: {vnet}")
        hlen = ihl + tcp_header_length(packet)
        if not ihl + 20 <= hlen <= total:
            raise MalformedPacket(f"TCP header ends at {hlen}, outside {ihl + 20}..{total}")
        return tso_split(decrement_ttl(packet), vnet.gso_size)
    if vnet.flags & VNET_F_NEEDS_CSUM:
        if vnet.csum_start < ihl:  # a transport checksum never lies in the IP header
            raise MalformedPacket(f"checksum starts inside the IP header: {vnet}")
        if vnet.csum_start + vnet.csum_offset + 2 > total:
            raise MalformedPacket(f"checksum field past the end: {vnet}")
        packet = complete_checksum(packet, vnet.csum_start, vnet.csum_offset)
    return [decrement_ttl(packet)]


def build_tcp(
    *,
    src: Address,
    dst: Address,
    sport: int = 40000,
    dport: int = 5201,
    seq: int = 0,
    ack: int = 0,
    flags: int = 0x10,
    window: int = 65535,
    tcp_options: bytes = b"",
    payload: bytes = b"",
    **ip: object,
) -> bytes:
    """An IPv4/TCP packet with both checksums right (``ip`` goes to build_ipv4)."""
    if len(tcp_options) % 4 or len(tcp_options) > 40:
        raise ValueError("TCP options must be a multiple of 4 bytes, at most 40")
    doff = (20 + len(tcp_options)) // 4
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, window, 0, 0)
    packet = build_ipv4(src=src, dst=dst, proto=PROTO_TCP, payload=tcp + tcp_options + payload, **ip)  # type: ignore[arg-type]
    return with_partial_checksum(packet, 16, complete=True)


def with_partial_checksum(packet: bytes, csum_offset: int, *, complete: bool = False) -> bytes:
    """The packet as the kernel hands it over with NEEDS_CSUM: the L4 checksum field
    (at csum_offset past the IP header) holding the pseudo-header sum; or, with
    ``complete``, finished from there."""
    ihl = (packet[0] & 15) * 4
    total = int.from_bytes(packet[2:4], "big")
    out = bytearray(packet)
    at = ihl + csum_offset
    out[at : at + 2] = pseudo_header_sum(out, total - ihl).to_bytes(2, "big")
    return complete_checksum(bytes(out), ihl, csum_offset) if complete else bytes(out)
