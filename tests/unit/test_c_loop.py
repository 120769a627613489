"""The c-loop: ``FastPath.run`` waits in C and moves both directions until told to stop or yield.

No root: the test_fastpath stand-ins (a socketpair for the TUN, loopback peers).
The loop runs on a thread, as a worker runs it; every check is on what arrives.
"""

from __future__ import annotations

import errno
import os
import select
import threading

import pytest

from tests.support import packets as h
from tunproxy.fastpath import RUN_STOP, RUN_YIELD, FastPathError

from .test_fastpath import NET, P2, Env, receive, udp


class Loop:
    """``env.fp.run`` on a thread, with its epoll and stop/yield eventfds."""

    def __init__(self, env: Env, epfd: int | None = None) -> None:
        self.env = env
        self.stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.yield_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.epoll = select.epoll()
        for fd in (env.tun.fileno(), env.udp.fileno(), self.stop_fd, self.yield_fd):
            self.epoll.register(fd, select.EPOLLIN)
        self.epfd = self.epoll.fileno() if epfd is None else epfd
        self.result: list[object] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        env = self.env
        try:
            self.result.append(
                env.fp.run(self.epfd, env.tun.fileno(), env.udp.fileno(), self.stop_fd, self.yield_fd)
            )
        except OSError as e:
            self.result.append(e)

    def signal(self, fd: int) -> object:
        """Make ``fd`` readable; what run returned."""
        os.eventfd_write(fd, 1)
        return self.join()

    def join(self) -> object:
        self.thread.join(5)
        assert not self.thread.is_alive(), "the C loop did not return"
        return self.result[0]

    def close(self) -> None:
        if self.thread.is_alive():
            self.signal(self.stop_fd)
        self.epoll.close()
        os.close(self.stop_fd)
        os.close(self.yield_fd)


@pytest.fixture
def env():
    e = Env()
    e.fp.set_routes({NET("10.244.1.0/24"): P2})
    yield e
    e.close()


def test_packets_cross_both_ways_on_one_call(env):
    loop = Loop(env)
    try:
        out = [udp("10.244.0.5", "10.244.1.7", size=50 + 10 * i) for i in range(5)]
        for p in out:
            env.inject(p)
            # Each arrives on a wake-up of its own, with no call into C in between.
            assert receive(env.peers[P2], 1) == [h.forward(p)]
        back = udp("10.244.1.7", "10.244.0.5", size=200)
        env.peers[P2].sendto(back, ("127.0.0.1", env.port))
        assert receive(env.kernel, 1) == [h.forward(back)]
        assert loop.thread.is_alive()
        assert loop.signal(loop.stop_fd) == RUN_STOP
    finally:
        loop.close()
    counters = env.counters()
    assert (counters.tx_packets, counters.rx_packets) == (5, 1)


def test_a_yield_returns_with_the_request_read_and_the_fast_path_free(env):
    loop = Loop(env)
    try:
        assert loop.signal(loop.yield_fd) == RUN_YIELD
        with pytest.raises(BlockingIOError):  # read by the C, so the next run waits again
            os.eventfd_read(loop.yield_fd)
        env.fp.update_routes([], {NET("10.244.2.0/24"): P2})
        assert env.fp.lookup("10.244.2.1") == P2
    finally:
        loop.close()


def test_a_stop_is_left_readable_for_every_later_run(env):
    loop = Loop(env)
    try:
        assert loop.signal(loop.stop_fd) == RUN_STOP
        assert select.select([loop.stop_fd], [], [], 0)[0] == [loop.stop_fd]
    finally:
        loop.close()


def test_an_error_is_raised_with_the_errno_and_nothing_forwarded(env):
    not_epoll = os.eventfd(0, os.EFD_CLOEXEC)
    loop = Loop(env, epfd=not_epoll)
    try:
        error = loop.join()
        assert isinstance(error, FastPathError) and error.errno == errno.EINVAL
        assert "run: Invalid argument" in str(error)
    finally:
        loop.close()
        os.close(not_epoll)
