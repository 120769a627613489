"""Offload mode of the C fast path against its pure-Python twin, over loopback.

As in test_fastpath, an AF_UNIX socketpair stands in for the TUN, now with a
virtio_net_hdr before every packet both ways, as IFF_VNET_HDR has it, and the
peers are loopback UDP sockets.  Loopback carries a UDP_SEGMENT send whole, so
a peer socket without UDP_GRO receives it as separate datagrams (the kernel
cuts it at the socket) and one with UDP_GRO receives it as one buffer: the
tests see the wire format exactly as a plain peer would.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support import packets as h
from tests.support.packets import VnetHdr
from tunproxy.fastpath import UDP_GRO, UDP_SEGMENT, FastPath, FastPathError, UdpGsoDisabled

from .test_fastpath import HYPO, LOCAL, MTU, NET, P2, P3, Env, receive, wait_readable


def _kernel_has_udp_offloads() -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.getsockopt(socket.SOL_UDP, UDP_SEGMENT)
            s.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
        except OSError:
            return False
    return True


pytestmark = pytest.mark.skipif(not _kernel_has_udp_offloads(), reason="needs UDP_SEGMENT and UDP_GRO")
SRC, DST = "10.9.0.1", "10.2.0.5"  # a host behind the TUN, and one behind a peer
PLAIN = VnetHdr()
SO_NO_CHECK = 11  # asm-generic/socket.h


@pytest.fixture
def env():
    e = Env(offload=True)
    e.fp.set_routes({NET("0.0.0.0/0"): P2})
    yield e
    e.close()


@pytest.fixture
def make_env():
    made: list[Env] = []

    def make(**kw) -> Env:
        made.append(Env(offload=True, **kw))
        made[-1].fp.set_routes({NET("0.0.0.0/0"): P2})
        return made[-1]

    yield make
    for e in made:
        e.close()


def udp(src: str, dst: str, size: int, **kw) -> bytes:
    return h.build_ipv4(src=src, dst=dst, payload=os.urandom(size), **kw)


def refreshed(packet: bytes) -> bytes:
    """Both checksums made right again after an edit."""
    out = bytearray(packet)
    ihl = (out[0] & 15) * 4
    out[10:12] = b"\0\0"
    out[10:12] = h.checksum(out[:ihl]).to_bytes(2, "big")
    return h.with_partial_checksum(bytes(out), 16, complete=True)


def tso(packet: bytes, mss: int, hdr_len: int = 0) -> tuple[VnetHdr, bytes]:
    """A TSO read as the kernel hands it over: the TCP checksum left partial."""
    ihl = (packet[0] & 15) * 4
    vnet = VnetHdr(h.VNET_F_NEEDS_CSUM, h.GSO_TCPV4, hdr_len, mss, ihl, 16)
    return vnet, h.with_partial_checksum(packet, 16)


def inject(env: Env, *reads: tuple[VnetHdr, bytes]) -> None:
    env.inject(*(vnet.pack() + packet for vnet, packet in reads))


def tun_writes(env: Env, count: int | None = None) -> list[tuple[VnetHdr, bytes]]:
    return [(VnetHdr.unpack(w), w[h.VNET_HDR.size :]) for w in receive(env.kernel, count)]


def unsplit(writes: list[tuple[VnetHdr, bytes]]) -> list[bytes]:
    """The packets TUN writes stand for: a TSO write is cut up by the twin."""
    out = []
    for vnet, packet in writes:
        if vnet.gso_type == h.GSO_TCPV4:
            assert vnet.flags == h.VNET_F_NEEDS_CSUM and (vnet.csum_start, vnet.csum_offset) == (20, 16)
            assert vnet.hdr_len == 20 + h.tcp_header_length(packet)
            out += h.tso_split(packet, vnet.gso_size)
        else:
            assert vnet == PLAIN
            out.append(packet)
    return out


def send_gso(sock: socket.socket, port: int, datagrams: list[bytes]) -> None:
    """One UDP_SEGMENT send of equal-sized datagrams (the last may be shorter)."""
    size = len(datagrams[0])
    cmsg = [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))] if len(datagrams) > 1 else []
    sock.sendmsg([b"".join(datagrams)], cmsg, 0, ("127.0.0.1", port))


def delta(env: Env, before, **expected: int) -> None:
    after = env.counters()
    got = {name: getattr(after, name) - getattr(before, name) for name in expected}
    assert got == expected


# ---- TUN -> UDP: TSO packets cut as the kernel would, sent in trains ----


@st.composite
def tso_packets(draw) -> tuple[bytes, int, int]:
    """A TCP super-packet, its MSS (segments fit the MTU) and a junk hdr_len."""
    ip_options = draw(st.binary(max_size=40))
    ip_options = ip_options[: len(ip_options) // 4 * 4]
    tcp_options = draw(st.binary(max_size=40))
    tcp_options = tcp_options[: len(tcp_options) // 4 * 4]
    hlen = 40 + len(ip_options) + len(tcp_options)
    mss = draw(st.integers(1, 64) | st.integers(1, MTU - hlen) | st.just(MTU - hlen))
    size = draw(st.integers(0, min(65535 - hlen, mss * 150)) | st.just(min(65535 - hlen, mss * 150)))
    packet = h.build_tcp(
        src=SRC,
        dst=DST,
        sport=draw(st.integers(0, 0xFFFF)),
        seq=draw(st.integers(0, 2**32 - 1) | st.just(2**32 - 3)),
        ack=draw(st.integers(0, 2**32 - 1)),
        flags=draw(st.integers(0, 255) | st.sampled_from([0x10, 0x18, 0x19, 0x98])),
        window=draw(st.integers(0, 0xFFFF)),
        tcp_options=tcp_options,
        payload=random.Random(draw(st.integers())).randbytes(size),
        ident=draw(st.integers(0, 0xFFFF) | st.just(0xFFFE)),
        ttl=draw(st.integers(2, 255)),
        tos=draw(st.integers(0, 255)),
        df=draw(st.booleans()),
        options=ip_options,
    )
    return packet, mss, draw(st.sampled_from([0, hlen, len(packet)]) | st.integers(0, 0xFFFF))


@HYPO
@given(case=tso_packets())
def test_tso_split_matches_python_twin(env, case):
    packet, mss, hdr_len = case
    vnet, read = tso(packet, mss, hdr_len)
    expected = h.offload_forward(vnet, read)
    before = env.counters()
    inject(env, (vnet, read))
    assert env.tx() == 1
    assert receive(env.peers[P2], len(expected)) == expected
    assert all(h.l4_checksum_ok(seg) and len(seg) <= MTU for seg in expected)
    n = len(expected)
    delta(env, before, tso_packets=1, tso_segments=n, tx_packets=n, tx_bytes=sum(map(len, expected)))
    after = env.counters()
    # Messages: trains of 2..64 datagrams (65507 bytes at most), and lone datagrams.
    trains = after.gso_sends - before.gso_sends
    in_trains = after.gso_segments - before.gso_segments
    assert 2 * trains <= in_trains <= 64 * trains
    per_message = min(64, 65507 // len(expected[0]))
    assert trains + (n - in_trains) in (-(-(n - 1) // per_message) or 1, -(-n // per_message))
    assert env.fp.udp_gso and after.peers[P2].tx_packets == after.tx_packets


@st.composite
def partial_reads(draw) -> tuple[VnetHdr, bytes]:
    """Non-TSO reads: TCP or UDP with the kernel's partial checksum, a checksum
    anywhere in the packet, or none to complete."""
    kind = draw(st.sampled_from(["tcp", "udp", "anywhere", "complete"]))
    payload = draw(st.binary(max_size=MTU - 80))
    options = draw(st.sampled_from([b"", b"\x01\x01\x01\x00" * 3]))
    ihl = 20 + len(options)
    if kind == "tcp":
        packet = h.build_tcp(src=SRC, dst=DST, payload=payload, flags=0x18, options=options)
        return VnetHdr(h.VNET_F_NEEDS_CSUM, 0, 0, 0, ihl, 16), h.with_partial_checksum(packet, 16)
    packet = h.build_ipv4(src=SRC, dst=DST, proto=17, payload=bytes(8) + payload, options=options)
    if kind == "udp":
        return VnetHdr(h.VNET_F_NEEDS_CSUM, 0, 0, 0, ihl, 6), h.with_partial_checksum(packet, 6)
    if kind == "anywhere":
        start = draw(st.integers(ihl, len(packet) - 2))  # anywhere past the IP header
        return VnetHdr(
            h.VNET_F_NEEDS_CSUM, 0, 0, 0, start, draw(st.integers(0, len(packet) - start - 2))
        ), packet
    return VnetHdr(), packet


@HYPO
@given(reads=st.lists(partial_reads(), min_size=1, max_size=8))
def test_partial_checksums_match_python_twin(env, reads):
    expected = [seg for vnet, packet in reads for seg in h.offload_forward(vnet, packet)]
    before = env.counters()
    inject(env, *reads)
    assert env.tx() == len(reads)
    assert receive(env.peers[P2], len(expected)) == expected
    completed = sum(1 for vnet, _ in reads if vnet.flags)
    delta(env, before, csum_completed=completed, tx_packets=len(expected), tso_packets=0)


@HYPO
@given(
    packet=st.one_of(
        st.builds(lambda p: h.build_tcp(src=SRC, dst=DST, payload=p), st.binary(max_size=600)),
        st.builds(lambda p: h.build_ipv4(src=SRC, dst=DST, payload=p), st.binary(max_size=600)),
    ),
    fields=st.tuples(
        st.integers(0, 3),
        st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x7F]) | st.integers(0, 255),
        st.integers(0, 0xFFFF),
        st.integers(0, 80) | st.integers(0, 0xFFFF),
        st.integers(0, 700) | st.integers(0, 0xFFFF),
        st.integers(0, 700) | st.integers(0, 0xFFFF),
    ),
)
def test_any_virtio_header_is_handled_like_the_twin(env, packet, fields):
    """Garbage in the virtio_net_hdr: the C drops exactly what the twin refuses."""
    vnet = VnetHdr(*fields)
    try:
        expected = h.offload_forward(vnet, packet)
    except h.MalformedPacket:
        expected = []
    before = env.counters()
    inject(env, (vnet, packet))
    assert env.tx() == 1
    assert receive(env.peers[P2], len(expected) or None) == expected
    assert env.counters().drops["malformed"] - before.drops["malformed"] == (0 if expected else 1)


def test_short_reads_and_the_wrong_offload_are_malformed(env):
    tcp = h.build_tcp(src=SRC, dst=DST, payload=bytes(3000))
    env.inject(b"", PLAIN.pack()[:9], PLAIN.pack())
    inject(env, (VnetHdr(0, 5, 0, 1000, 20, 6), tcp))  # UDP_L4 GSO: not asked for
    assert env.tx() == 4
    assert env.counters().drops["malformed"] == 4 and receive(env.peers[P2]) == []


def test_runs_of_equal_datagrams_share_a_send(env):
    a = [udp(SRC, DST, size=80, ident=i) for i in range(5)]
    short = udp(SRC, DST, size=40)
    inject(env, *((PLAIN, p) for p in [*a, short, a[0]]))
    assert env.tx() == 7
    assert receive(env.peers[P2], 7) == [h.forward(p) for p in [*a, short, a[0]]]
    c = env.counters()
    # 5 equal + 1 shorter is one train; nothing may follow the shorter one.
    assert (c.gso_sends, c.gso_segments, c.tx_batches, c.tx_max_batch) == (1, 6, 1, 7)


def test_trains_stop_at_another_peer_or_oversize(env):
    env.fp.set_routes({NET("10.2.0.0/16"): P2, NET("10.3.0.0/16"): P3})
    to2, to3 = udp(SRC, "10.2.0.1", size=50), udp(SRC, "10.3.0.1", size=50)
    big = udp(SRC, "10.2.0.1", size=MTU + 100)  # no DF: leaves alone, the kernel fragments it
    inject(env, *((PLAIN, p) for p in [to2, to3, to2, big, big]))
    assert env.tx() == 5
    assert receive(env.peers[P2], 4) == [h.forward(p) for p in [to2, to2, big, big]]
    assert receive(env.peers[P3], 1) == [h.forward(to3)]
    assert env.counters().gso_sends == 0


@pytest.mark.parametrize(
    ("mss", "size", "trains", "in_trains"),
    [
        (1360, 65535 - 40, 2, 49),  # 46 datagrams of 1400 bytes fill a send (65507 bytes at most)
        (100, 20000, 4, 200),  # 64 datagrams per send at most
        (1000, 1000, 0, 0),  # one segment: no train
        (1000, 1001, 1, 2),
    ],
)
def test_gso_send_limits(env, mss, size, trains, in_trains):
    packet = h.build_tcp(src=SRC, dst=DST, payload=os.urandom(size), df=True)
    vnet, read = tso(packet, mss)
    inject(env, (vnet, read))
    assert env.tx() == 1
    expected = h.offload_forward(vnet, read)
    assert receive(env.peers[P2], len(expected)) == expected
    c = env.counters()
    assert (c.gso_sends, c.gso_segments, c.tx_packets) == (trains, in_trains, len(expected))


def test_queue_flushes_when_full(make_env):
    """A small send queue (one 64 KiB buffer, 2 * batch + 16 = 20 messages)
    is sent whenever it fills up, and everything still leaves in order."""
    env = make_env(batch=2, gso_buffer=65535)
    trains = tso(h.build_tcp(src=SRC, dst=DST, payload=os.urandom(40000), df=True), 1000)
    # Segments over the MTU without DF leave one per message, for the kernel to fragment.
    singles = tso(h.build_tcp(src=SRC, dst=DST, payload=os.urandom(35000)), MTU)
    reads = [trains, singles, trains]
    inject(env, *reads)
    assert env.tx() == 2 and env.tx() == 1
    expected = [seg for vnet, packet in reads for seg in h.offload_forward(vnet, packet)]
    assert receive(env.peers[P2], len(expected)) == expected
    c = env.counters()
    assert (c.gso_sends, c.gso_segments, c.tx_packets) == (2, 80, 105)
    assert c.tx_batches >= 3  # the first call flushed before its end


def test_tso_too_big_with_df_gets_frag_needed(env):
    packet = h.build_tcp(src=SRC, dst=DST, payload=bytes(5000), df=True)
    vnet, read = tso(packet, MTU - 39)  # segments one byte over the MTU
    inject(env, (vnet, read))
    assert env.tx() == 1
    [(hdr, msg)] = tun_writes(env, 1)
    assert hdr == PLAIN and msg == h.icmp_frag_needed(read, LOCAL, MTU)
    assert env.counters().drops["too_big"] == 1 and receive(env.peers[P2]) == []


def test_no_route_and_ttl_errors_carry_a_virtio_header(env):
    env.fp.set_routes({NET("10.2.0.0/16"): P2})
    lost, dying = udp(SRC, "10.7.0.1", size=30), udp(SRC, DST, size=30, ttl=1)
    inject(env, (PLAIN, lost), (PLAIN, dying))
    assert env.tx() == 2
    assert tun_writes(env, 2) == [
        (PLAIN, h.icmp_net_unreachable(lost, LOCAL)),
        (PLAIN, h.icmp_time_exceeded(dying, LOCAL)),
    ]


def test_refused_gso_falls_back_once(env):
    """The kernel refuses UDP_SEGMENT on a socket without checksums (SO_NO_CHECK:
    EINVAL); the datagrams still go, one by one, and Python hears of it once."""
    env.udp.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    packets = [udp(SRC, DST, size=60, ident=i) for i in range(5)]
    inject(env, *((PLAIN, p) for p in packets))
    with pytest.raises(UdpGsoDisabled) as e:
        env.tx()
    assert e.value.count == 5 and e.value.errno == 22 and isinstance(e.value, FastPathError)
    assert receive(env.peers[P2], 5) == [h.forward(p) for p in packets]
    assert not env.fp.udp_gso
    vnet, read = tso(h.build_tcp(src=SRC, dst=DST, payload=os.urandom(5000)), 1000)
    inject(env, (vnet, read))
    assert env.tx() == 1  # no exception the second time
    assert receive(env.peers[P2], 5) == h.offload_forward(vnet, read)
    c = env.counters()
    assert (c.gso_sends, c.tx_packets, c.drops["send"]) == (0, 10, 0)


def test_gso_can_be_off_from_the_start(make_env):
    env = make_env(udp_gso=False)
    vnet, read = tso(h.build_tcp(src=SRC, dst=DST, payload=os.urandom(5000)), 1000)
    inject(env, (vnet, read))
    assert env.tx() == 1
    assert receive(env.peers[P2], 5) == h.offload_forward(vnet, read)
    c = env.counters()
    assert (c.tso_segments, c.gso_sends, c.tx_batches, c.tx_max_batch) == (5, 0, 1, 5)


# ---- UDP -> TUN: GRO buffers split, TCP segments coalesced into TSO writes ----


def gro_env(env: Env) -> Env:
    env.udp.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
    return env


def test_gro_buffer_is_split_into_its_datagrams(env):
    gro_env(env)
    packets = [udp(DST, SRC, size=100, ident=i) for i in range(9)] + [udp(DST, SRC, size=30)]
    before = env.counters()
    send_gso(env.peers[P2], env.port, packets)
    wait_readable(env.udp)
    assert env.rx() == 1  # one buffer ...
    assert tun_writes(env, 10) == [(PLAIN, h.forward(p)) for p in packets]  # ... ten writes
    delta(env, before, gro_receives=1, gro_segments=10, rx_packets=10, rx_batches=1, rx_max_batch=10)


def test_gro_buffer_datagrams_are_checked_one_by_one(env):
    gro_env(env)
    good = udp(DST, SRC, size=72)
    bad_sum = good[:10] + b"\0\0" + good[12:]
    dying = udp(DST, SRC, size=72, ttl=1)
    send_gso(env.peers[P2], env.port, [good, bad_sum, dying, good])
    wait_readable(env.udp)
    assert env.rx() == 1
    assert tun_writes(env, 2) == [(PLAIN, h.forward(good))] * 2
    assert receive(env.peers[P2], 1) == [h.icmp_time_exceeded(dying, LOCAL)]
    c = env.counters()
    assert (c.drops["malformed"], c.drops["ttl"], c.rx_packets) == (1, 1, 2)


def stream(n: int, mss: int = 1000, seq: int = 7, flags: int = 0x10, **kw) -> list[bytes]:
    """n segments of one TCP flow as a TSO sender puts them on the wire: IP IDs
    and sequence numbers counting up, PSH (if any) on the last one only."""
    return [
        h.build_tcp(
            src=DST,
            dst=SRC,
            seq=(seq + i * mss) % 2**32,
            ident=(100 + i) & 0xFFFF,
            flags=flags if i == n - 1 else flags & ~h.TCP_PSH,
            payload=os.urandom(mss),
            df=True,
            **kw,
        )
        for i in range(n)
    ]


def test_a_tcp_train_becomes_one_tso_write(env):
    gro_env(env)
    segments = stream(40, flags=0x18)  # PSH on the last one only
    before = env.counters()
    send_gso(env.peers[P2], env.port, segments)
    wait_readable(env.udp)
    assert env.rx() == 1
    [(vnet, packet)] = writes = tun_writes(env, 1)
    assert (vnet.gso_type, vnet.gso_size, len(packet)) == (h.GSO_TCPV4, 1000, 40 + 40 * 1000)
    assert unsplit(writes) == [h.forward(s) for s in segments]
    total = sum(map(len, segments))
    delta(env, before, tun_gso_writes=1, tun_gso_segments=40, rx_packets=40, rx_bytes=total)


def test_spoofed_segments_in_a_gro_buffer_are_dropped_and_the_rest_coalesce(env):
    """Anti-spoofing on the offload path: each datagram of a UDP_GRO buffer is
    checked, a spoofed one never joins (or breaks) a coalesced write."""
    gro_env(env)
    env.fp.set_routes({NET("10.2.0.0/16"): P2, NET("10.3.0.0/16"): P3})  # DST is in P2's subnet
    segments = stream(6)
    forged = h.build_tcp(src="10.3.0.9", dst=SRC, seq=7 + 3 * 1000, ident=103, payload=bytes(1000), df=True)
    before = env.counters()
    send_gso(env.peers[P2], env.port, segments[:3] + [forged] + segments[3:])
    wait_readable(env.udp)
    assert env.rx() == 1
    writes = tun_writes(env, 1)
    assert unsplit(writes) == [h.forward(s) for s in segments]
    delta(env, before, rx_packets=6, tun_gso_writes=1, tun_gso_segments=6, gro_segments=7)
    assert env.counters().drops["spoofed"] - before.drops["spoofed"] == 1


def test_allow_any_source_on_the_offload_path(make_env):
    env = make_env(allow_any_source=True)
    gro_env(env)
    env.fp.set_routes({NET("10.3.0.0/16"): P2})  # DST is nobody's
    segments = stream(4)
    send_gso(env.peers[P2], env.port, segments)
    wait_readable(env.udp)
    assert env.rx() == 1
    assert unsplit(tun_writes(env, 1)) == [h.forward(s) for s in segments]
    assert env.counters().drops["spoofed"] == 0


def test_coalescing_across_datagrams_and_its_limits(env):
    """Separate datagrams coalesce too; a write holds at most 64 KiB."""
    segments = stream(70, mss=1300)
    for s in segments:
        env.peers[P2].sendto(s, ("127.0.0.1", env.port))
    time.sleep(0.1)
    assert env.rx() == 64 and env.rx() == 6
    writes = tun_writes(env)
    assert unsplit(writes) == [h.forward(s) for s in segments]
    assert [len(p) for _, p in writes] == [40 + 50 * 1300, 40 + 14 * 1300, 40 + 6 * 1300]


def perturb(segments: list[bytes], data) -> list[bytes]:
    """Ways a segment may not continue the one before it."""
    out = []
    for segment in segments:
        how = data.draw(st.sampled_from(["keep"] * 6 + ["flags", "sum", "id", "window", "drop", "options"]))
        s = bytearray(segment)
        if how == "flags":
            s[33] = data.draw(st.sampled_from([0x11, 0x12, 0x14, 0x18, 0x30, 0x90, 0x08]))
        elif how == "sum":
            s[37] ^= 1
        elif how == "id":
            s[4] ^= 0x40
        elif how == "window":
            s[34] ^= 1
        elif how == "drop":
            continue
        elif how == "options":
            s = bytearray(h.build_ipv4(src=DST, dst=SRC, proto=6, payload=bytes(s[20:]), options=b"\x01" * 4))
        if how in ("flags", "id", "window"):
            s = bytearray(refreshed(bytes(s)))
        out.append(bytes(s))
    return out


@HYPO
@given(data=st.data())
def test_coalesced_writes_stand_for_exactly_the_packets_received(env, data):
    """Whatever arrives, the TUN writes, cut up again, are the packets that came
    in (TTL - 1), in order; and an unbroken run of one flow becomes one write."""
    flows = [
        stream(data.draw(st.integers(1, 12)), mss=data.draw(st.integers(1, 1300)), seq=i * 99, sport=i)
        for i in range(data.draw(st.integers(1, 3)))
    ]
    if data.draw(st.booleans()):
        segments = perturb([s for flow in flows for s in flow], data)
        if data.draw(st.booleans()):
            data.draw(st.randoms()).shuffle(segments)
    else:
        segments = flows[0]
    for s in segments:
        env.peers[P2].sendto(s, ("127.0.0.1", env.port))
    time.sleep(0.02)
    deadline = time.monotonic() + 2
    start = env.counters().rx_packets  # the env lives on from example to example
    while env.counters().rx_packets - start < len(segments):
        env.rx()
        assert time.monotonic() < deadline
    writes = tun_writes(env)
    assert unsplit(writes) == [h.forward(s) for s in segments]
    if segments is flows[0]:
        assert len(writes) == 1


def test_failed_tso_write_is_counted(env):
    gro_env(env)
    send_gso(env.peers[P2], env.port, stream(5))
    wait_readable(env.udp)
    ro = os.open("/dev/null", os.O_RDONLY)
    try:
        assert env.fp.udp_to_tun(env.udp.fileno(), ro, 0) == 1
    finally:
        os.close(ro)
    c = env.counters()
    assert (c.drops["tun_write"], c.rx_packets, c.tun_gso_writes) == (5, 0, 0)


# ---- the wrapper ----


def test_offload_arguments_and_counters():
    with pytest.raises(ValueError, match="headroom"):
        FastPath(mtu=MTU, local_addr=LOCAL, offload=True, headroom=8)
    with pytest.raises(ValueError, match="gso_buffer"):
        FastPath(mtu=MTU, local_addr=LOCAL, offload=True, gso_buffer=65534)
    with pytest.raises(ValueError, match="slot_size"):  # a TSO read would not fit
        FastPath(mtu=MTU, local_addr=LOCAL, offload=True, slot_size=64 + MTU)
    fp = FastPath(mtu=MTU, local_addr=LOCAL, offload=True, udp_gso=False)
    assert fp.offload and not fp.udp_gso and "offload=True" in repr(fp)
    plain = FastPath(mtu=MTU, local_addr=LOCAL)
    assert not plain.offload and not plain.udp_gso
    line = plain.counters().summary()
    for name in ("tso_packets=0", "gso_sends=0", "gso_segments=0", "gro_segments=0", "tun_gso_writes=0"):
        assert name in line
    assert line.endswith(" peers=0") and f"local_addr={LOCAL}," in repr(plain)
