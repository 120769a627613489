"""TUN USO (UDP trains on the TUN) in the C fast path, against its pure-Python twin.

The set-up is test_offload's: an AF_UNIX socketpair stands in for the TUN,
with a virtio_net_hdr before every packet both ways, and the peers are
loopback UDP sockets.  With ``uso=True`` the fast path behaves as if the TUN
took TUN_F_USO4|TUN_F_USO6: a read may be a UDP train (GSO_UDP_L4) to cut
into datagrams, and runs of one flow's received datagrams are written back
as one train.
"""

from __future__ import annotations

import os
import random
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support import packets as h
from tests.support.packets import VnetHdr

from .test_fastpath import HYPO, MTU, NET, P2, P3, Env, receive, wait_readable
from .test_offload import (
    PLAIN,
    _kernel_has_udp_offloads,
    delta,
    gro_env,
    inject,
    send_gso,
    stream,
    tun_writes,
)

pytestmark = pytest.mark.skipif(not _kernel_has_udp_offloads(), reason="needs UDP_SEGMENT and UDP_GRO")
SRC, DST = "10.9.0.1", "10.2.0.5"  # a host behind the TUN, and one behind a peer


@pytest.fixture
def make_env():
    made: list[Env] = []

    def make(**kw) -> Env:
        kw.setdefault("uso", True)
        made.append(Env(offload=True, **kw))
        made[-1].fp.set_routes({NET("0.0.0.0/0"): P2})
        return made[-1]

    yield make
    for e in made:
        e.close()


@pytest.fixture
def env(make_env):
    return make_env()


def train(packet: bytes, size: int, *, partial: bool = True) -> tuple[VnetHdr, bytes]:
    """A UDP train as the kernel hands it over: the UDP checksum left partial
    (the pseudo-header sum over the whole train) unless ``partial`` is False."""
    ihl = (packet[0] & 15) * 4
    if not partial:
        return VnetHdr(0, h.GSO_UDP_L4, ihl + 8, size, 0, 0), packet
    return VnetHdr(h.VNET_F_NEEDS_CSUM, h.GSO_UDP_L4, ihl + 8, size, ihl, 6), h.with_partial_checksum(
        packet, 6
    )


def udp_packet(
    payload: bytes, *, sport: int = 4000, dport: int = 5201, checksum: int | None = None, **ip
) -> bytes:
    """An IPv4/UDP packet, its UDP length the whole; the checksum right unless given."""
    header = sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + (8 + len(payload)).to_bytes(2, "big")
    packet = h.build_ipv4(proto=17, payload=header + b"\0\0" + payload, **ip)
    if checksum is None:
        return h.with_partial_checksum(packet, 6, complete=True)
    ihl = (packet[0] & 15) * 4
    return packet[: ihl + 6] + checksum.to_bytes(2, "big") + packet[ihl + 8 :]


# ---- TUN -> UDP: trains cut as __udp_gso_segment would ----


@st.composite
def udp_trains(draw) -> tuple[VnetHdr, bytes]:
    options = draw(st.binary(max_size=40))
    options = options[: len(options) // 4 * 4]
    hlen = 28 + len(options)
    size = draw(st.integers(1, 64) | st.integers(1, MTU - hlen) | st.just(MTU - hlen))
    total = draw(st.integers(0, min(65535 - hlen, size * 100)) | st.just(min(65535 - hlen, size * 100)))
    packet = udp_packet(
        random.Random(draw(st.integers())).randbytes(total),
        sport=draw(st.integers(0, 0xFFFF)),
        src=SRC,
        dst=DST,
        ident=draw(st.integers(0, 0xFFFF) | st.just(0xFFFE)),
        ttl=draw(st.integers(2, 255)),
        tos=draw(st.integers(0, 255)),
        df=draw(st.booleans()),
        options=options,
    )
    how = draw(st.sampled_from(["partial", "complete", "none"]))
    if how == "none":  # a train that says it carries no UDP checksum
        ihl = 20 + len(options)
        return train(packet[: ihl + 6] + b"\0\0" + packet[ihl + 8 :], size, partial=False)
    return train(packet, size, partial=how == "partial")


@HYPO
@given(read=udp_trains())
def test_uso_split_matches_python_twin(env, read):
    vnet, packet = read
    expected = h.offload_forward(vnet, packet, uso=True)
    before = env.counters()
    inject(env, read)
    assert env.tx() == 1
    assert receive(env.peers[P2], len(expected)) == expected
    n = len(expected)
    delta(env, before, uso_packets=1, uso_segments=n, tx_packets=n, tso_packets=0, csum_completed=0)
    none = vnet.flags == 0 and packet[(packet[0] & 15) * 4 + 6 :][:2] == b"\0\0"
    assert all(len(d) <= MTU and (none or h.l4_checksum_ok(d)) for d in expected)
    if n > 1 and len(expected[0]) * 2 <= 65507:
        assert env.counters().gso_sends > before.gso_sends  # the datagrams leave in trains again


def test_a_udp_checksum_of_zero_goes_out_as_ffff(env):
    """RFC 768: a computed 0 is sent as all ones, 0 meaning "no checksum"."""
    payload = bytearray(os.urandom(100))
    payload[-2:] = b"\0\0"
    first = udp_packet(bytes(payload), src=SRC, dst=DST, ttl=65)
    # Choose the last word so that the datagram after forwarding sums to 0xFFFF.
    forwarded = h.forward(first)
    ihl = 20
    pseudo = forwarded[12:20] + bytes([0, 17]) + (len(forwarded) - ihl).to_bytes(2, "big")
    rest = forwarded[ihl : ihl + 6] + b"\0\0" + forwarded[ihl + 8 :]
    word = (0xFFFF - (~h.checksum(pseudo + rest) & 0xFFFF)) & 0xFFFF
    payload[-2:] = word.to_bytes(2, "big")
    second = udp_packet(bytes(os.urandom(100)), src=SRC, dst=DST, ttl=65)
    packet = udp_packet(bytes(payload) + second[28:], src=SRC, dst=DST, ttl=65)
    read = train(packet, 100)
    expected = h.offload_forward(*read, uso=True)
    assert expected[0][26:28] == b"\xff\xff" and h.l4_checksum_ok(expected[0])
    inject(env, read)
    assert env.tx() == 1
    assert receive(env.peers[P2], 2) == expected


def test_uso_reads_are_malformed_unless_uso_was_granted(make_env):
    packet = udp_packet(os.urandom(3000), src=SRC, dst=DST)
    off = make_env(uso=False)
    assert not off.fp.uso
    inject(off, train(packet, 1000))
    assert off.tx() == 1 and off.counters().drops["malformed"] == 1 and receive(off.peers[P2]) == []
    on = make_env()
    assert on.fp.uso
    bad = [
        train(h.build_tcp(src=SRC, dst=DST, payload=bytes(3000)), 1000),  # not UDP
        (VnetHdr(h.VNET_F_NEEDS_CSUM, h.GSO_UDP_L4, 28, 0, 20, 6), packet),  # no gso_size
        train(udp_packet(bytes(3000), src=SRC, dst=DST, mf=True), 1000),  # a fragment
        (
            VnetHdr(0, h.GSO_UDP_L4, 28, 100, 0, 0),
            h.build_ipv4(src=SRC, dst=DST, payload=bytes(7)),
        ),  # no header
        (VnetHdr(0, h.GSO_UDP_L4 | h.GSO_ECN, 28, 100, 0, 0), packet),
    ]
    inject(on, *bad)
    assert on.tx() == len(bad)
    assert on.counters().drops["malformed"] == len(bad) and receive(on.peers[P2]) == []
    assert on.counters().uso_packets == 0


def test_uso_train_too_big_with_df_gets_frag_needed(env):
    packet = udp_packet(bytes(5000), src=SRC, dst=DST, df=True)
    inject(env, train(packet, MTU - 27))  # datagrams one byte over the MTU
    assert env.tx() == 1
    [(hdr, msg)] = tun_writes(env, 1)
    assert hdr == PLAIN and msg[9] == 1 and msg[20:22] == b"\x03\x04"
    assert env.counters().drops["too_big"] == 1 and receive(env.peers[P2]) == []


@HYPO
@given(
    packet=st.builds(lambda p: udp_packet(p, src=SRC, dst=DST), st.binary(max_size=3000)),
    fields=st.tuples(
        st.integers(0, 3),
        st.sampled_from([0, 1, 5, 0x85]) | st.integers(0, 255),
        st.integers(0, 0xFFFF),
        st.integers(0, 700) | st.integers(0, 0xFFFF),
        st.integers(0, 700) | st.integers(0, 0xFFFF),
        st.integers(0, 700) | st.integers(0, 0xFFFF),
    ),
)
def test_any_virtio_header_with_uso_is_handled_like_the_twin(env, packet, fields):
    vnet = VnetHdr(*fields)
    try:
        expected = h.offload_forward(vnet, packet, uso=True)
    except h.MalformedPacket:
        expected = []
    before = env.counters()
    inject(env, (vnet, packet))
    assert env.tx() == 1
    assert receive(env.peers[P2], len(expected) or None) == expected
    assert env.counters().drops["malformed"] - before.drops["malformed"] == (0 if expected else 1)


# ---- UDP -> TUN: runs of one flow's datagrams written as one train ----


def flow(n: int, size: int = 1000, last: int | None = None, ident: int = 100, **kw) -> list[bytes]:
    """n datagrams of one flow from behind the peer, IP IDs counting up as a UDP_SEGMENT sender's."""
    sizes = [size] * n if last is None else [size] * (n - 1) + [last]
    return [
        udp_packet(os.urandom(s), src=DST, dst=SRC, ident=(ident + i) & 0xFFFF, df=True, **kw)
        for i, s in enumerate(sizes)
    ]


def unsplit(writes: list[tuple[VnetHdr, bytes]]) -> list[bytes]:
    """The datagrams TUN writes stand for: a USO write cut up by the twin."""
    out = []
    for vnet, packet in writes:
        if vnet.gso_type == h.GSO_UDP_L4:
            assert (vnet.flags, vnet.hdr_len, vnet.csum_start, vnet.csum_offset) == (
                h.VNET_F_NEEDS_CSUM,
                28,
                20,
                6,
            )
            out += h.uso_split(packet, vnet.gso_size)
        elif vnet.gso_type == h.GSO_TCPV4:
            out += h.tso_split(packet, vnet.gso_size)
        else:
            assert vnet == PLAIN
            out.append(packet)
    return out


def test_a_udp_train_becomes_one_uso_write(env):
    gro_env(env)
    datagrams = flow(40, last=300)
    before = env.counters()
    send_gso(env.peers[P2], env.port, datagrams)
    wait_readable(env.udp)
    assert env.rx() == 1
    writes = tun_writes(env, 1)
    forwarded = [h.forward(d) for d in datagrams]
    assert writes == h.uso_coalesce(forwarded)
    [(vnet, packet)] = writes
    assert (vnet.gso_type, vnet.gso_size, len(packet)) == (h.GSO_UDP_L4, 1000, 28 + 39 * 1000 + 300)
    assert unsplit(writes) == forwarded
    total = sum(map(len, datagrams))
    delta(env, before, tun_uso_writes=1, tun_uso_segments=40, rx_packets=40, rx_bytes=total, tun_gso_writes=0)


def test_ip_ids_need_not_follow(env):
    datagrams = [
        udp_packet(os.urandom(500), src=DST, dst=SRC, ident=random.randrange(65536)) for _ in range(6)
    ]
    for d in datagrams:
        env.peers[P2].sendto(d, ("127.0.0.1", env.port))
    wait_readable(env.udp)
    assert env.rx() == 6
    writes = tun_writes(env)
    assert writes == h.uso_coalesce([h.forward(d) for d in datagrams]) and len(writes) == 1
    # Cut again, each datagram's UDP header and payload are what was sent.
    assert [d[20:] for d in unsplit(writes)] == [d[20:] for d in datagrams]


def test_without_uso_datagrams_are_written_one_by_one(make_env):
    env = gro_env(make_env(uso=False))
    datagrams = flow(10)
    send_gso(env.peers[P2], env.port, datagrams)
    wait_readable(env.udp)
    assert env.rx() == 1
    assert tun_writes(env, 10) == [(PLAIN, h.forward(d)) for d in datagrams]
    assert env.counters().tun_uso_writes == 0


def test_udp_and_tcp_runs_keep_their_order(env):
    udp_a, tcp, udp_b = flow(3, size=200), stream(3, mss=200), flow(4, size=300, sport=7)
    for d in udp_a + tcp + udp_b:
        env.peers[P2].sendto(d, ("127.0.0.1", env.port))
    wait_readable(env.udp)
    assert env.rx() == 10
    writes = tun_writes(env)
    assert [v.gso_type for v, _ in writes] == [h.GSO_UDP_L4, h.GSO_TCPV4, h.GSO_UDP_L4]
    assert unsplit(writes) == [h.forward(d) for d in udp_a + tcp + udp_b]
    c = env.counters()
    assert (c.tun_uso_writes, c.tun_uso_segments, c.tun_gso_writes, c.tun_gso_segments) == (2, 7, 1, 3)


def perturb(datagrams: list[bytes], data) -> list[bytes]:
    """Ways a datagram may not continue the one before it, or not be coalesced at all."""
    out = []
    for d in datagrams:
        how = data.draw(
            st.sampled_from(["keep"] * 6 + ["sum", "nosum", "port", "ttl", "short", "pad", "drop"])
        )
        payload = d[28:]
        kw = {"src": DST, "dst": SRC, "ident": int.from_bytes(d[4:6], "big"), "df": True}
        if how == "sum":
            d = d[:27] + bytes([d[27] ^ 1]) + d[28:]
        elif how == "nosum":
            d = udp_packet(payload, checksum=0, **kw)
        elif how == "port":
            d = udp_packet(payload, sport=9, **kw)
        elif how == "ttl":
            d = udp_packet(payload, ttl=9, **kw)
        elif how == "short":
            d = udp_packet(payload[: len(payload) // 2], **kw)
        elif how == "pad":  # UDP length shorter than the packet: never merged
            inner = bytearray(d[20:] + b"pad")
            d = h.build_ipv4(proto=17, payload=bytes(inner), **kw)
        elif how == "drop":
            continue
        out.append(d)
    return out


@HYPO
@given(data=st.data())
def test_coalesced_udp_writes_match_the_twin(env, data):
    """Whatever arrives, the TUN writes are the twin's for each receive call,
    and cut up again they are the datagrams that came in (TTL - 1)."""
    flows = [
        flow(data.draw(st.integers(1, 12)), size=data.draw(st.integers(1, 1300)), sport=i, ident=i * 1000)
        for i in range(data.draw(st.integers(1, 3)))
    ]
    datagrams = perturb([d for f in flows for d in f], data)
    if data.draw(st.booleans()):
        data.draw(st.randoms()).shuffle(datagrams)
    for d in datagrams:
        env.peers[P2].sendto(d, ("127.0.0.1", env.port))
    forwarded = [h.forward(d) for d in datagrams]
    # A write never spans two receive calls: apply the twin call by call.
    expected, taken, deadline = [], 0, time.monotonic() + 2
    while taken < len(datagrams):
        got = env.rx()
        expected += h.uso_coalesce(forwarded[taken : taken + got])
        taken += got
        assert time.monotonic() < deadline
    writes = tun_writes(env, len(expected) or None)
    assert writes == expected
    pads = [d for d in datagrams if int.from_bytes(d[24:26], "big") != len(d) - 20]
    if not pads:
        assert [d[:4] + d[6:10] + d[12:] for d in unsplit(writes)] == [
            d[:4] + d[6:10] + d[12:] for d in forwarded
        ]


def test_a_uso_write_holds_at_most_64_datagrams_and_64_kib(env):
    small, big = flow(70, size=100), flow(50, size=1300, sport=9)
    for d in small:
        env.peers[P2].sendto(d, ("127.0.0.1", env.port))
    wait_readable(env.udp)
    assert env.rx() == 64 and env.rx() == 6
    assert [len(p) for _, p in tun_writes(env)] == [28 + 64 * 100, 28 + 6 * 100]
    for d in big:
        env.peers[P2].sendto(d, ("127.0.0.1", env.port))
    wait_readable(env.udp)
    assert env.rx() == 50
    assert [len(p) for _, p in tun_writes(env)] == [28 + 50 * 1300]  # 65028 bytes: fits
    more = flow(51, size=1300, sport=10)
    for d in more:
        env.peers[P2].sendto(d, ("127.0.0.1", env.port))
    wait_readable(env.udp)
    assert env.rx() == 51
    assert [len(p) for _, p in tun_writes(env)] == [28 + 50 * 1300, 28 + 1300]


def test_failed_uso_write_is_counted(env):
    gro_env(env)
    send_gso(env.peers[P2], env.port, flow(5))
    wait_readable(env.udp)
    ro = os.open("/dev/null", os.O_RDONLY)
    try:
        assert env.fp.udp_to_tun(env.udp.fileno(), ro, 0) == 1
    finally:
        os.close(ro)
    c = env.counters()
    assert (c.drops["tun_write"], c.rx_packets, c.tun_uso_writes) == (5, 0, 0)


def test_spoofed_datagrams_never_join_a_train(env):
    gro_env(env)
    env.fp.set_routes({NET("10.2.0.0/16"): P2, NET("10.3.0.0/16"): P3})
    good = flow(4)
    forged = udp_packet(os.urandom(1000), src="10.3.0.9", dst=SRC, ident=102, df=True)
    send_gso(env.peers[P2], env.port, good[:2] + [forged] + good[2:])
    wait_readable(env.udp)
    assert env.rx() == 1
    writes = tun_writes(env)
    assert len(writes) == 1 and unsplit(writes) == [h.forward(d) for d in good]
    assert env.counters().drops["spoofed"] == 1
