"""The pure-Python header math (tests/support/packets.py), against RFC examples and
brute-force recomputation."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support import packets as h

LOCAL = IPv4Address("10.244.0.0")


def full_checksum(header: bytes) -> int:
    """The header checksum recomputed from scratch (checksum field zeroed)."""
    return h.checksum(header[:10] + b"\0\0" + header[12:])


def ones_add(a: int, b: int) -> int:
    s = a + b
    return (s & 0xFFFF) + (s >> 16)


@st.composite
def valid_packets(draw, *, max_payload: int = 64) -> bytes:
    """Random valid IPv4 packets; often with a checksum near the wrap point."""
    options = draw(st.binary(max_size=40))
    options = options[: len(options) // 4 * 4]
    fields = dict(
        src=draw(st.integers(0, 2**32 - 1)),
        dst=draw(st.integers(0, 2**32 - 1)),
        payload=draw(st.binary(max_size=max_payload)),
        proto=draw(st.integers(0, 255)),
        ttl=draw(st.integers(1, 255)),
        tos=draw(st.integers(0, 255)),
        df=draw(st.booleans()),
        options=options,
    )
    ident = draw(st.integers(0, 0xFFFF))
    target = draw(st.none() | st.sampled_from([0x0000, 0x0001, 0x00FF, 0x0100, 0xFEFF, 0xFFFE]))
    if target is not None:
        # Pick the ID that makes the checksum come out as `target`: the
        # one's complement sum must become ~target.
        base = h.build_ipv4(ident=0, **fields)
        ident = ones_add(~target & 0xFFFF, int.from_bytes(base[10:12], "big"))
    return h.build_ipv4(ident=ident, **fields)


# ---- checksum ----


def test_checksum_rfc1071_example():
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to 0xddf2.
    assert h.checksum(bytes.fromhex("0001f203f4f5f6f7")) == ~0xDDF2 & 0xFFFF


def test_checksum_known_ipv4_header():
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert h.checksum(header) == 0xB861
    filled = header[:10] + bytes.fromhex("b861") + header[12:]
    assert h.checksum(filled) == 0


def test_checksum_odd_length_pads_with_zero():
    assert h.checksum(b"\x12\x34\x56") == h.checksum(b"\x12\x34\x56\x00")


def test_checksum_empty_and_all_ones():
    assert h.checksum(b"") == 0xFFFF
    assert h.checksum(b"\xff\xff") == 0


def test_incremental_update_rfc1624_example():
    # RFC 1624 section 4: eqn. 3 gives 0x0000 where eqn. 2 gives 0xFFFF.
    assert h.incremental_update(0xDD2F, 0x5555, 0x3285) == 0x0000


@given(st.lists(st.integers(0, 0xFFFF), min_size=2, max_size=30), st.data())
def test_incremental_update_matches_recompute_for_any_word(words, data):
    i = data.draw(st.integers(0, len(words) - 1))
    new = data.draw(st.integers(0, 0xFFFF))
    before = struct.pack(f"!{len(words)}H", *words)
    after_words = list(words)
    after_words[i] = new
    after = struct.pack(f"!{len(after_words)}H", *after_words)
    got = h.incremental_update(h.checksum(before), words[i], new)
    # Equal as one's complement numbers (0x0000 and 0xFFFF are both zero).
    assert got % 0xFFFF == h.checksum(after) % 0xFFFF


@given(valid_packets())
def test_ttl_decrement_equals_full_recompute(packet):
    out = h.decrement_ttl(packet)
    hlen = (packet[0] & 15) * 4
    assert out[8] == packet[8] - 1
    assert out[:8] == packet[:8] and out[9:10] == packet[9:10] and out[12:] == packet[12:]
    # Not just equivalent: bit-for-bit what a full recompute gives.
    assert int.from_bytes(out[10:12], "big") == full_checksum(out[:hlen])
    assert h.checksum(out[:hlen]) == 0


@given(valid_packets())
def test_ttl_decrement_accepts_the_other_zero(packet):
    """A checksum stored as 0xFFFF (valid, but not what a sender computes)."""
    hlen = (packet[0] & 15) * 4
    if int.from_bytes(packet[10:12], "big") != 0:
        return
    odd = packet[:10] + b"\xff\xff" + packet[12:]
    h.parse_ipv4(odd)  # still valid
    out = h.decrement_ttl(odd)
    assert int.from_bytes(out[10:12], "big") == full_checksum(out[:hlen])


def test_checksum_wrap_cases_are_generated():
    """The strategy really produces the 0x0000 checksum the test above needs."""
    packet = h.build_ipv4(src="10.0.0.1", dst="10.0.0.2", ttl=9)
    ident = ones_add(0xFFFF, int.from_bytes(packet[10:12], "big"))
    wrapped = h.build_ipv4(src="10.0.0.1", dst="10.0.0.2", ttl=9, ident=ident)
    assert int.from_bytes(wrapped[10:12], "big") == 0
    out = h.decrement_ttl(wrapped)
    assert int.from_bytes(out[10:12], "big") == full_checksum(out[:20])


def test_decrement_ttl_zero_refused():
    with pytest.raises(ValueError):
        h.decrement_ttl(h.build_ipv4(src="1.1.1.1", dst="2.2.2.2", ttl=0))


# ---- parsing ----


def test_parse_roundtrip():
    pkt = h.build_ipv4(
        src="10.1.2.3",
        dst="10.4.5.6",
        payload=b"hello",
        proto=6,
        ttl=17,
        ident=0x1234,
        tos=0x10,
        df=True,
        options=b"\x01\x01\x01\x00",
    )
    hdr = h.parse_ipv4(pkt)
    assert hdr.src == IPv4Address("10.1.2.3") and hdr.dst == IPv4Address("10.4.5.6")
    assert (hdr.proto, hdr.ttl, hdr.ident, hdr.tos) == (6, 17, 0x1234, 0x10)
    assert hdr.ihl == 6 and hdr.header_length == 24 and hdr.total_length == 29
    assert hdr.dont_fragment and hdr.frag_offset == 0
    assert hdr.options == b"\x01\x01\x01\x00"


GOOD = h.build_ipv4(src="10.0.0.1", dst="10.0.0.2", payload=b"x" * 12)


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (b"", "shorter"),
        (GOOD[:19], "shorter"),
        (bytes([0x65]) + GOOD[1:], "version 6"),
        (bytes([0x44]) + GOOD[1:], "header length 16"),
        (bytes([0x4F]) + GOOD[1:], "header length 60"),
        (h.build_ipv4(src="1.1.1.1", dst="2.2.2.2", payload=b"x" * 12, total_length=19), "total"),
        (h.build_ipv4(src="1.1.1.1", dst="2.2.2.2", payload=b"x" * 12, total_length=33), "total"),
        (GOOD[:10] + bytes([GOOD[10] ^ 1]) + GOOD[11:], "checksum"),
    ],
)
def test_parse_rejects(packet, reason):
    with pytest.raises(h.MalformedPacket, match=reason):
        h.parse_ipv4(packet)


def test_forward_trims_trailing_bytes():
    out = h.forward(GOOD + b"junk")
    assert len(out) == len(GOOD) and out[8] == GOOD[8] - 1 and out[20:] == GOOD[20:]


@given(st.binary(max_size=100))
def test_parse_never_raises_anything_else(data):
    try:
        h.parse_ipv4(data)
    except h.MalformedPacket:
        pass


# ---- ICMP errors ----


def check_icmp(msg: bytes, orig: bytes, icmp_type: int, code: int, mtu: int = 0) -> None:
    hdr = h.parse_ipv4(msg)  # also checks the IP header checksum
    o = h.parse_ipv4(orig)
    assert (hdr.proto, hdr.ttl, hdr.src, hdr.dst) == (1, 64, LOCAL, o.src)
    assert hdr.total_length == len(msg)
    icmp = msg[20:]
    assert h.checksum(icmp) == 0
    assert (icmp[0], icmp[1]) == (icmp_type, code)
    assert int.from_bytes(icmp[4:6], "big") == 0
    assert int.from_bytes(icmp[6:8], "big") == mtu
    assert icmp[8:] == orig[: min(o.header_length + 8, o.total_length)]


@given(valid_packets(max_payload=40), st.binary(max_size=8))
def test_icmp_builders(packet, trailing):
    orig = packet + trailing
    check_icmp(h.icmp_net_unreachable(orig, LOCAL), packet, 3, 0)
    check_icmp(h.icmp_time_exceeded(orig, LOCAL), packet, 11, 0)
    check_icmp(h.icmp_frag_needed(orig, LOCAL, 1450), packet, 3, 4, 1450)


def test_icmp_quotes_header_with_options_and_eight_bytes():
    options = b"\x94\x04\x00\x00" * 2
    pkt = h.build_ipv4(src="10.0.0.5", dst="10.9.0.1", payload=bytes(range(30)), options=options)
    msg = h.icmp_net_unreachable(pkt, LOCAL)
    assert msg[28:] == pkt[: 28 + 8]
    assert len(msg) == 28 + 28 + 8


def test_icmp_quotes_short_packet_whole():
    pkt = h.build_ipv4(src="10.0.0.5", dst="10.9.0.1", payload=b"abc")
    assert h.icmp_time_exceeded(pkt + b"trailing", LOCAL)[28:] == pkt


def icmp_packet(icmp_type: int, **kw) -> bytes:
    return h.build_ipv4(
        src="10.0.0.5", dst="10.9.0.1", proto=1, payload=bytes([icmp_type, 0]) + b"\0" * 6, **kw
    )


@pytest.mark.parametrize(
    ("packet", "due"),
    [
        (h.build_ipv4(src="10.0.0.5", dst="10.9.0.1"), True),
        (icmp_packet(8), True),  # echo request
        (icmp_packet(0), True),  # echo reply
        (icmp_packet(3), False),
        (icmp_packet(4), False),
        (icmp_packet(5), False),
        (icmp_packet(11), False),
        (icmp_packet(12), False),
        (h.build_ipv4(src="10.0.0.5", dst="10.9.0.1", proto=1), False),  # no ICMP type
        (h.build_ipv4(src="10.0.0.5", dst="10.9.0.1", mf=True), True),  # first fragment
        (h.build_ipv4(src="10.0.0.5", dst="10.9.0.1", frag_offset=1), False),
        (icmp_packet(8, frag_offset=3), False),
        (h.build_ipv4(src="0.0.0.0", dst="10.9.0.1"), False),
        (h.build_ipv4(src="224.0.0.5", dst="10.9.0.1"), False),
        (h.build_ipv4(src="10.0.0.5", dst="224.0.0.251"), False),
        (h.build_ipv4(src="10.0.0.5", dst="255.255.255.255"), False),
        (h.build_ipv4(src="240.0.0.1", dst="10.9.0.1"), False),
    ],
)
def test_icmp_error_due(packet, due):
    assert h.icmp_error_due(packet) is due


def test_build_rejects_bad_options():
    with pytest.raises(ValueError):
        h.build_ipv4(src="1.1.1.1", dst="2.2.2.2", options=b"\x01")


# ---- offload: partial checksums and TSO ----


def fresh_l4_checksum(packet: bytes, offset: int) -> int:
    """The L4 checksum computed from scratch (RFC 793/768), the field zeroed."""
    hlen, total = (packet[0] & 15) * 4, int.from_bytes(packet[2:4], "big")
    segment = bytearray(packet[hlen:total])
    segment[offset : offset + 2] = b"\0\0"
    pseudo = packet[12:20] + bytes([0, packet[9]]) + len(segment).to_bytes(2, "big")
    return h.checksum(pseudo + segment)


@st.composite
def tcp_packets(draw, *, max_payload: int = 3000, **ip) -> bytes:
    options = draw(st.binary(max_size=40))
    tcp_options = draw(st.binary(max_size=40))
    return h.build_tcp(
        src=draw(st.integers(1, 0xDFFFFFFF)),
        dst=draw(st.integers(1, 0xDFFFFFFF)),
        sport=draw(st.integers(0, 0xFFFF)),
        dport=draw(st.integers(0, 0xFFFF)),
        seq=draw(st.integers(0, 2**32 - 1)),
        ack=draw(st.integers(0, 2**32 - 1)),
        flags=draw(st.integers(0, 255)),
        window=draw(st.integers(0, 0xFFFF)),
        tcp_options=tcp_options[: len(tcp_options) // 4 * 4],
        payload=draw(st.binary(max_size=max_payload)),
        ident=draw(st.integers(0, 0xFFFF)),
        ttl=draw(st.integers(2, 255)),
        options=options[: len(options) // 4 * 4],
        **ip,
    )


@given(tcp_packets(max_payload=200), st.booleans())
def test_complete_checksum_equals_a_fresh_one(packet, as_udp):
    if as_udp:  # same bytes, relabelled: the UDP checksum sits at offset 6
        packet = h.build_ipv4(src="10.0.0.1", dst="10.0.0.2", proto=17, payload=bytes(8) + packet[40:])
    offset = 6 if as_udp else 16
    partial = h.with_partial_checksum(packet, offset)
    hlen = (packet[0] & 15) * 4
    done = h.complete_checksum(partial, hlen, offset)
    assert h.l4_checksum_ok(done)
    assert int.from_bytes(done[hlen + offset : hlen + offset + 2], "big") == (
        fresh_l4_checksum(packet, offset) or 0xFFFF
    )
    assert done[: hlen + offset] == partial[: hlen + offset]


def test_complete_checksum_never_writes_zero():
    base = h.build_ipv4(src="10.0.0.1", dst="10.0.0.2", proto=17, payload=bytes(8) + b"\0\0abcdef")
    # Pick two payload bytes that make the sum all ones, so the checksum is 0.
    partial = bytearray(h.with_partial_checksum(base, 6))
    fill = ~h.checksum(partial[20:]) & 0xFFFF
    partial[28:30] = (~fill & 0xFFFF).to_bytes(2, "big")
    assert h.checksum(partial[20:]) == 0
    done = h.complete_checksum(bytes(partial), 20, 6)
    assert done[26:28] == b"\xff\xff" and h.l4_checksum_ok(done)


@given(tcp_packets(max_payload=6000, df=True), st.integers(1, 1500))
def test_tso_split_makes_the_packets_a_sender_would(packet, mss):
    hlen = (packet[0] & 15) * 4
    thlen = h.tcp_header_length(packet)
    payload = packet[hlen + thlen :]
    segments = h.tso_split(h.with_partial_checksum(packet, 16), mss)
    assert b"".join(s[hlen + thlen :] for s in segments) == payload
    assert len(segments) == max(1, -(-len(payload) // mss))
    flags = packet[hlen + 13]
    for n, seg in enumerate(segments):
        last = n == len(segments) - 1
        ip = h.parse_ipv4(seg)  # checks the header checksum
        assert ip.total_length == len(seg) and len(seg) - hlen - thlen <= mss
        assert ip.ident == (int.from_bytes(packet[4:6], "big") + n) & 0xFFFF
        seq = int.from_bytes(seg[hlen + 4 : hlen + 8], "big")
        assert seq == (int.from_bytes(packet[hlen + 4 : hlen + 8], "big") + n * mss) % 2**32
        want = flags
        if not last:
            want &= ~(h.TCP_FIN | h.TCP_PSH)
        if n:
            want &= ~h.TCP_CWR
        assert seg[hlen + 13] == want
        assert h.l4_checksum_ok(seg)
        # Everything else is the super-packet's.
        assert seg[:2] == packet[:2] and seg[6:10] == packet[6:10] and seg[12:hlen] == packet[12:hlen]
        assert seg[hlen : hlen + 4] == packet[hlen : hlen + 4]
        assert seg[hlen + 8 : hlen + 13] == packet[hlen + 8 : hlen + 13]
        assert seg[hlen + 14 : hlen + 16] == packet[hlen + 14 : hlen + 16]
        assert seg[hlen + 18 : hlen + thlen] == packet[hlen + 18 : hlen + thlen]


def test_tso_split_of_a_bare_header_is_one_packet():
    ack = h.build_tcp(src="10.0.0.1", dst="10.0.0.2", flags=0x11)
    [seg] = h.tso_split(ack, 1000)
    assert seg == h.with_partial_checksum(ack, 16, complete=True)


def test_vnet_hdr_layout():
    v = h.VnetHdr(flags=1, gso_type=1, hdr_len=52, gso_size=1420, csum_start=20, csum_offset=16)
    assert len(v.pack()) == 10 == h.VNET_HDR.size
    assert h.VnetHdr.unpack(v.pack() + b"rest") == v
    assert v.pack()[:2] == b"\x01\x01"


TSO = h.VnetHdr(flags=h.VNET_F_NEEDS_CSUM, gso_type=h.GSO_TCPV4, gso_size=100, csum_start=20, csum_offset=16)
TCP = h.build_tcp(src="10.0.0.1", dst="10.0.0.2", payload=bytes(300))


@pytest.mark.parametrize(
    ("vnet", "packet", "reason"),
    [
        (TSO, h.build_ipv4(src="10.0.0.1", dst="10.0.0.2", proto=17, payload=bytes(300)), "TSO"),
        (h.VnetHdr(gso_type=3, gso_size=100), TCP, "TSO"),  # UFO
        (h.VnetHdr(gso_type=h.GSO_TCPV4, gso_size=0), TCP, "TSO"),
        (TSO, h.build_ipv4(src="10.0.0.1", dst="10.0.0.2", proto=6, payload=bytes(10)), "TSO"),
        (TSO, h.build_ipv4(src="10.0.0.1", dst="10.0.0.2", proto=6, payload=TCP[20:], mf=True), "TSO"),
        (TSO, TCP[:32] + b"\x40" + TCP[33:], "TCP"),  # data offset 4
        (TSO, TCP[:30], "shorter|total"),
        (h.VnetHdr(flags=h.VNET_F_NEEDS_CSUM, csum_start=20, csum_offset=len(TCP) - 21), TCP, "past"),
    ],
)
def test_offload_forward_refuses(vnet, packet, reason):
    with pytest.raises(h.MalformedPacket, match=reason):
        h.offload_forward(vnet, packet)


def test_offload_forward_plain_and_ecn():
    assert h.offload_forward(h.VnetHdr(), TCP + b"junk") == [h.forward(TCP)]
    ecn = h.VnetHdr(gso_type=h.GSO_TCPV4 | h.GSO_ECN, gso_size=100)
    assert h.offload_forward(ecn, TCP) == h.tso_split(h.decrement_ttl(TCP), 100)
