"""fast-csum: the checksum code of offload mode.

The C checksums (scalar, AVX2 where the CPU has it, and summing while
copying) are held to the pure-Python twin over every length up to 2000 and
any alignment; the TSO send path, with fast-csum on, off and as on a CPU
without AVX2, must put on the wire exactly what the twin's tcp_gso_segment
does, also when it has to flush early or the kernel refuses UDP_SEGMENT.
"""

from __future__ import annotations

import os
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support import packets as h
from tunproxy.fastpath import UdpGsoDisabled, ffi, lib

from .test_fastpath import HYPO, NET, P2, Env, receive
from .test_offload import DST, SO_NO_CHECK, SRC, delta, inject, tso, tso_packets

COMBOS = [
    pytest.param({"fast_csum": True}, id="fast-csum"),
    pytest.param({"fast_csum": False}, id="scalar"),
    pytest.param({"fast_csum": True, "simd": False}, id="fast-csum-refused"),
]


def twin_sum16(data: bytes, start: int) -> int:
    """sum16 as the C has it: the folded, uncomplemented sum plus ``start``."""
    total = (0xFFFF - h.checksum(data)) + start if data else start
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


FAST, PORTABLE = lib.FP_FEAT_FAST_CSUM, lib.FP_FEAT_FAST_CSUM | lib.FP_FEAT_CSUM_NO_SIMD
CODES = [0, FAST, PORTABLE]  # scalar, AVX2 where the CPU has it, the portable fast code


@pytest.mark.parametrize("fast", CODES)
@HYPO
@given(data=st.binary(max_size=2000), offset=st.integers(0, 63), start=st.integers(0, 0x1FFFE))
def test_sum16_matches_the_twin_at_any_alignment(fast, data, offset, start):
    buf = ffi.new("uint8_t[]", len(data) + 64)
    ffi.memmove(buf + offset, data, len(data))
    got = lib.fp_sum16(buf + offset, len(data), start, fast)
    assert got == twin_sum16(data, start)
    assert got == lib.fp_sum16(buf + offset, len(data), start, 0)


def test_sum16_every_length_of_all_ones_and_zeros():
    """Every length 0..2000 from odd and even addresses, with the words that carry most."""
    buf = ffi.new("uint8_t[]", 2100)
    for fill in (b"\xff", b"\x00", b"\x80\x01"):
        data = (fill * 2100)[:2100]
        ffi.memmove(buf, data, len(data))
        for offset in (0, 1):
            for n in range(2001):
                want = twin_sum16(data[offset : offset + n], 0)
                for code in CODES:
                    assert lib.fp_sum16(buf + offset, n, 0, code) == want, (fill, offset, n, code)


@pytest.mark.parametrize("fast", CODES)
@HYPO
@given(
    data=st.binary(max_size=2000),
    src_off=st.integers(0, 63),
    dst_off=st.integers(0, 63),
    start=st.integers(0, 0xFFFF),
)
def test_copy_and_sum_copies_exactly_and_sums_like_the_twin(fast, data, src_off, dst_off, start):
    n = len(data)
    src = ffi.new("uint8_t[]", n + 64)
    dst = ffi.new("uint8_t[]", n + 128)
    ffi.memmove(src + src_off, data, n)
    ffi.memmove(dst, b"\xaa" * (n + 128), n + 128)
    got = lib.fp_csum_copy(dst + dst_off, src + src_off, n, start, fast)
    assert got == twin_sum16(data, start)
    out = bytes(ffi.buffer(dst, n + 128))
    assert out[dst_off : dst_off + n] == data
    assert out[:dst_off] == b"\xaa" * dst_off and out[dst_off + n :] == b"\xaa" * (128 - dst_off)


def test_fast_csum_says_whether_avx2_is_used():
    """Not an assertion about speed: fp_have_avx2 agrees with the CPU's flags."""
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    if os.uname().machine == "x86_64":
        assert bool(lib.fp_have_avx2()) == ("avx2" in flags)


@pytest.fixture(params=COMBOS)
def features(request):
    return request.param


@pytest.fixture
def make_env(features):
    made: list[Env] = []

    def make(**kw) -> Env:
        made.append(Env(offload=True, **features, **kw))
        made[-1].fp.set_routes({NET("0.0.0.0/0"): P2})
        return made[-1]

    yield make
    for e in made:
        e.close()


def test_the_features_are_what_was_asked(make_env, features):
    env = make_env()
    assert env.fp.fast_csum == features["fast_csum"]
    simd = features["fast_csum"] and features.get("simd", True) and bool(lib.fp_have_avx2())
    assert env.fp.csum_simd == simd


@HYPO
@given(case=tso_packets())
def test_tso_split_matches_the_twin_with_each_feature_set(make_env, case):
    env = make_env()
    packet, mss, hdr_len = case
    vnet, read = tso(packet, mss, hdr_len)
    expected = h.offload_forward(vnet, read)
    before = env.counters()
    inject(env, (vnet, read))
    assert env.tx() == 1
    assert receive(env.peers[P2], len(expected)) == expected
    delta(env, before, tso_packets=1, tx_packets=len(expected), tx_bytes=sum(map(len, expected)))


def test_a_batch_of_reads_mixed_with_small_packets(make_env):
    """Several TSO reads in one call between small packets: all leave in order."""
    env = make_env(batch=8)
    reads = []
    for i in range(8):
        if i % 3 == 2:
            small = h.build_ipv4(src=SRC, dst=DST, proto=17, payload=os.urandom(60), ident=i)
            reads.append((h.VnetHdr(), small))
        else:
            packet = h.build_tcp(src=SRC, dst=DST, seq=i * 100000, payload=os.urandom(20000 + i), df=True)
            reads.append(tso(packet, 1360))
    inject(env, *reads)
    assert env.tx() == 8
    expected = [seg for vnet, p in reads for seg in h.offload_forward(vnet, p)]
    assert receive(env.peers[P2], len(expected)) == expected
    c = env.counters()
    assert (c.tx_packets, c.drops["send"]) == (len(expected), 0)


def test_queue_flushes_when_full(make_env):
    """A tiny queue (one 64 KiB buffer, 20 messages) is sent early, in order."""
    env = make_env(batch=2, gso_buffer=65535)
    trains = tso(h.build_tcp(src=SRC, dst=DST, payload=os.urandom(40000), df=True), 1000)
    singles = tso(h.build_tcp(src=SRC, dst=DST, payload=os.urandom(35000)), 1400)
    reads = [trains, singles, trains]
    inject(env, *reads)
    assert env.tx() == 2 and env.tx() == 1
    expected = [seg for vnet, packet in reads for seg in h.offload_forward(vnet, packet)]
    assert receive(env.peers[P2], len(expected)) == expected
    assert env.counters().tx_packets == len(expected)


def test_refused_gso_on_a_tso_read_sends_each_datagram(make_env):
    """The kernel refuses UDP_SEGMENT (SO_NO_CHECK: EINVAL) on a train cut
    from a TSO read: each datagram still leaves, headers and payload intact."""
    env = make_env()
    env.udp.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
    vnet, read = tso(h.build_tcp(src=SRC, dst=DST, payload=os.urandom(9000), df=True), 1000)
    inject(env, (vnet, read))
    with pytest.raises(UdpGsoDisabled) as e:
        env.tx()
    assert e.value.count == 1
    expected = h.offload_forward(vnet, read)
    assert receive(env.peers[P2], len(expected)) == expected
    c = env.counters()
    assert (c.tx_packets, c.gso_sends, c.drops["send"]) == (len(expected), 0, 0)
