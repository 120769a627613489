"""drain: ``udp_to_tun`` sends the replies waiting in the TUN after its writes, by fastpath.h's rule.

No root: the test_fastpath stand-ins (a socketpair for the TUN, loopback
peers). A reply the kernel would make within the TUN write (an ACK, an echo
reply) is put in the TUN before the call; what the peer gets, and the send
counter, say whether that call read it.
"""

from __future__ import annotations

import os

import pytest

from tests.support import packets as h
from tests.support.packets import VnetHdr
from tunproxy._fastpath_cffi import lib

from .test_fastpath import NET, P2, Env, receive, udp

MISSES, PROBE = lib.FP_REPLY_MISSES, lib.FP_REPLY_PROBE


@pytest.fixture(params=[False, True], ids=["plain", "offload"])
def env(request):
    e = Env(drain=True, offload=request.param)
    e.fp.set_routes({NET("10.244.1.0/24"): P2})
    yield e
    e.close()


def put_in_tun(env: Env, packet: bytes) -> None:
    """``packet`` waiting to be read from the TUN (behind a plain virtio_net_hdr in offload mode)."""
    env.inject(VnetHdr().pack() + packet if env.fp.offload else packet)


def wake_up(env: Env, reply: bytes | None = None) -> int:
    """A datagram from P2 and one ``udp_to_tun`` call, with ``reply`` waiting in the TUN; the
    packets the call sent (the fast path's tx counter)."""
    if reply is not None:
        put_in_tun(env, reply)
    before = env.counters().tx_packets
    env.send_from(P2, udp("10.244.1.7", "10.244.0.5", size=40))
    assert env.rx() == 1
    assert receive(env.kernel, 1)  # written to the TUN
    return env.counters().tx_packets - before


def reply(i: int = 0) -> bytes:
    return udp("10.244.0.5", "10.244.1.7", size=60 + i)


def test_a_reply_waiting_in_the_tun_goes_out_in_the_same_call(env):
    answer = reply()
    assert wake_up(env, answer) == 1
    assert receive(env.peers[P2], 1) == [h.forward(answer)]


def test_without_drain_the_reply_waits_for_the_tuns_own_read():
    env = Env()
    try:
        env.fp.set_routes({NET("10.244.1.0/24"): P2})
        answer = reply()
        assert wake_up(env, answer) == 0
        assert receive(env.peers[P2]) == []
        assert env.tx() == 1  # still there
        assert receive(env.peers[P2], 1) == [h.forward(answer)]
    finally:
        env.close()


def test_after_misses_in_a_row_only_one_call_in_probe_reads(env):
    for _ in range(MISSES):  # each reads and finds nothing
        assert wake_up(env) == 0
    answer = reply()
    put_in_tun(env, answer)  # an application's late answer: left for the TUN's own read, or the probe
    sent = [wake_up(env) for _ in range(PROBE)]
    assert sent == [0] * (PROBE - 1) + [1]  # counted across calls, in the context
    assert receive(env.peers[P2], 1) == [h.forward(answer)]


def test_a_probe_that_finds_a_reply_turns_the_read_back_on(env):
    for _ in range(MISSES):
        wake_up(env)
    put_in_tun(env, reply())
    assert sum(wake_up(env) for _ in range(PROBE)) == 1  # the probe took it
    assert [wake_up(env, reply(i)) for i in range(MISSES + 2)] == [1] * (MISSES + 2)


def test_a_drain_read_that_fails_counts_as_a_miss_not_as_an_error(env):
    write_only_r, write_only = os.pipe()  # the datagrams' packets can be written there, never read back
    try:
        for _ in range(MISSES):
            env.send_from(P2, udp("10.244.1.7", "10.244.0.5", size=40))
            assert env.fp.udp_to_tun(env.udp.fileno(), write_only, env.now) == 1  # EBADF from the read
    finally:
        os.close(write_only_r)
        os.close(write_only)
    assert wake_up(env, reply()) == 0  # four misses in a row: the next read is the probe's
