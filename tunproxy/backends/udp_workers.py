"""The udp backend's worker threads: a TUN queue, a socket and a thread each (``--workers N``; one
worker with the c-loop too).

With N > 1 the TUN is opened with IFF_MULTI_QUEUE, one fd per queue, and
the UDP port is bound N times with SO_REUSEPORT (``udp_devices``; which
worker a flow lands on: ``udp_steering``). Worker ``i`` owns queue ``i``, socket
``i`` and a ``FastPath`` of its own (its buffers, counters, drop ring and a
copy of the routes); its thread waits in ``epoll`` and calls the C fast path,
and both release the GIL, so the workers run on as many cores.

With the c-loop (the default) a worker's thread waits in ``FastPath.run``,
in C, and is woken by the kernel straight into the fast path; ``--workers 1``
is then one such worker on the one TUN queue and socket. Without it
(``--without c-loop``) the thread waits in a Python epoll and calls the C
per wake-up, and ``--workers 1`` is the event loop's readers instead.

The rule for the shared state, so there is no data race: a worker's
``FastPath`` is touched by its thread only inside ``Worker.lock``, held
around each C call (and, with the c-loop, while it waits in C: whoever needs
the lock asks for it through an eventfd, and the thread gives it up); the event-loop thread takes the
same lock to change the routes (``update_routes``, ``set_routes``, which also
grow the tables) or to read counters and the drop ring. Every worker gets
every route change, one worker after the other; the fast path validates a
change before making it, and all workers hold the same table, so a change
that one refuses is refused by the first, before any has changed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from ipaddress import IPv4Address, IPv4Network

from ..counters import COUNTERS, Counters, Drop, PeerCounters
from ..fastpath import RUN_STOP, RUN_TUN_GONE, RUN_YIELD, FastPath, UdpGsoDisabled, now_ms

log = logging.getLogger(__name__)

ErrorReport = Callable[[str, OSError], None]
"""Called from a worker thread with ``(direction, error)`` when a C call fails: ``"tun->udp"``,
``"udp->tun"`` (Python-epoll workers) or ``"c-loop"`` (``FastPath.run``, both ways at once)."""


def sum_counters(snapshots: Sequence[Counters]) -> Counters:
    """The counters of several workers as one: totals add up, gauges (high-water marks) take the largest.

    Per-peer counters add up by peer. ValueError for no snapshots.
    """
    if not snapshots:
        raise ValueError("no counters to add up")
    values: dict[str, int] = {}
    for name in snapshots[0].values:
        column = [s.values[name] for s in snapshots]
        described = COUNTERS.get(name)
        values[name] = max(column) if described is not None and described.gauge else sum(column)
    peers: dict[IPv4Address, PeerCounters] = {}
    for s in snapshots:
        for addr, p in s.peers.items():
            q = peers.get(addr)
            peers[addr] = (
                p
                if q is None
                else PeerCounters(
                    q.tx_packets + p.tx_packets,
                    q.tx_bytes + p.tx_bytes,
                    q.rx_packets + p.rx_packets,
                    q.rx_bytes + p.rx_bytes,
                )
            )
    return Counters(values, peers)


def merge_drops(rings: Iterable[list[Drop]]) -> list[Drop]:
    """The drop rings of several workers as one list, oldest first (stable by ``time_ms``)."""
    return sorted((d for ring in rings for d in ring), key=lambda d: d.time_ms)


class Worker:
    """One thread moving packets between TUN queue ``tun_fd`` and socket ``sock_fd`` with ``fastpath``.

    ``lock`` guards ``fastpath`` (see the module docstring); take it with
    ``holding()``. ``report`` is called, from the worker's thread, for each
    failed C call. With ``c_loop`` the thread waits in C (``FastPath.run``)
    and holds the lock while it does; ``holding()`` then asks it to give the
    lock up (an eventfd) and the thread waits until no one wants it before
    taking it back. Without, it waits in a Python epoll and holds the lock
    only around each C call.
    """

    def __init__(
        self,
        index: int,
        fastpath: FastPath,
        tun_fd: int,
        sock_fd: int,
        report: ErrorReport,
        c_loop: bool = False,
    ) -> None:
        self.index = index
        self.fastpath = fastpath
        self.tun_fd, self.sock_fd = tun_fd, sock_fd
        self.lock = threading.Lock()
        self.c_loop = c_loop
        self._report = report
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._yield = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._wanted = 0  # threads in holding(), under _wanted_lock
        self._wanted_lock = threading.Lock()
        self._resume = threading.Event()  # set when the last of them is done
        self._run = self._run_c if c_loop else self._run_py
        self.thread = threading.Thread(target=self._run, name=f"tunproxy-worker-{index}", daemon=True)

    @contextlib.contextmanager
    def holding(self) -> Iterator[FastPath]:
        """The fast path, with its lock held (a C loop is asked to give it up first).

        Called from the event loop's thread, as ``stop`` is. A stopped or dead
        worker holds nothing: the lock is then free and taken at once."""
        if not self.c_loop or self._yield < 0 or not self.thread.is_alive():
            with self.lock:
                yield self.fastpath
            return
        with self._wanted_lock:
            self._wanted += 1
        try:
            os.eventfd_write(self._yield, 1)
            with self.lock:
                yield self.fastpath
        finally:
            with self._wanted_lock:
                self._wanted -= 1
                if not self._wanted:
                    self._resume.set()

    def start(self) -> None:
        """Start the thread (once)."""
        self.thread.start()

    @property
    def died(self) -> bool:
        """True if the thread ended while it should be running (a bug; it logged why)."""
        return self._wake >= 0 and self.thread.ident is not None and not self.thread.is_alive()

    def restart(self) -> None:
        """A new thread on the same queue, socket and fast path, after ``died``."""
        self.thread = threading.Thread(target=self._run, name=self.thread.name, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Wake the thread, wait for it to end, close the wake-up fds; idempotent."""
        if self._wake < 0:
            return
        if self.thread.is_alive():
            os.eventfd_write(self._wake, 1)
            self.thread.join()
        os.close(self._wake)
        os.close(self._yield)
        self._wake = self._yield = -1

    def _run_c(self) -> None:
        tun, sock, lock, fp = self.tun_fd, self.sock_fd, self.lock, self.fastpath
        tun_gone, errors = False, 0
        poller = select.epoll()
        try:
            for fd in (tun, sock, self._wake, self._yield):
                poller.register(fd, select.EPOLLIN)
            while True:
                try:
                    with lock:
                        why = fp.run(poller.fileno(), tun, sock, self._wake, self._yield)
                    errors = 0
                except UdpGsoDisabled as e:  # raised once; the datagrams went out one by one
                    self._report("tun->udp", e)
                    why = RUN_YIELD
                except OSError as e:
                    self._report("c-loop", e)
                    errors += 1  # the same failure again at once: do not spin on it
                    time.sleep(min(0.001 * errors, 0.1))
                    why = RUN_YIELD
                if why == RUN_STOP:
                    return
                if why == RUN_TUN_GONE and not tun_gone:  # readable for ever: leave it to the check,
                    tun_gone = True  # which makes a new TUN and a new pool
                    self._report("tun->udp", OSError(errno.EBADFD, os.strerror(errno.EBADFD)))
                    poller.unregister(tun)
                while True:  # let whoever asked take the lock; go on the moment they are done
                    self._resume.clear()
                    if not self._wanted:
                        break
                    self._resume.wait(0.1)
        except Exception:  # a bug: say so rather than die silently; the other workers go on
            log.exception("worker %d stopped", self.index)
        finally:
            poller.close()

    def _run_py(self) -> None:
        tun, sock, wake, lock, fp = self.tun_fd, self.sock_fd, self._wake, self.lock, self.fastpath
        poller = select.epoll()
        try:
            for fd in (tun, sock, wake):
                poller.register(fd, select.EPOLLIN)
            while True:
                ready = {fd for fd, _ in poller.poll()}  # the GIL is released while waiting
                if wake in ready:
                    return
                now = now_ms()
                if tun in ready:
                    try:
                        with lock:
                            fp.tun_to_udp(tun, sock, now)
                    except OSError as e:  # UdpGsoDisabled too (raised once; the datagrams went out)
                        self._report("tun->udp", e)
                        if e.errno == errno.EBADFD:  # the device was deleted: readable for ever
                            poller.unregister(tun)  # until the backend's check makes a new pool
                if sock in ready:
                    try:
                        with lock:
                            fp.udp_to_tun(sock, tun, now)
                    except OSError as e:
                        self._report("udp->tun", e)
        except Exception:  # a bug: say so rather than die silently; the other workers go on
            log.exception("worker %d stopped", self.index)
        finally:
            poller.close()


class WorkerPool:
    """The workers of one udp backend, with the face of one ``FastPath`` for the rest of tunproxy.

    ``fastpaths``, ``tun_fds`` and ``sock_fds`` are parallel (one each per
    worker, all alike in configuration and routes). ``counters()``,
    ``drops()`` and ``drops_total`` add the workers up; route changes go to
    every worker. ``start`` starts the threads, ``stop`` ends and joins them
    (the fds stay the caller's to close). ``c_loop``: each worker waits in C
    (``FastPath.run``) rather than in a Python epoll.
    """

    def __init__(
        self,
        fastpaths: Sequence[FastPath],
        tun_fds: Sequence[int],
        sock_fds: Sequence[int],
        report: ErrorReport,
        c_loop: bool = False,
    ) -> None:
        if not len(fastpaths) == len(tun_fds) == len(sock_fds) or not fastpaths:
            raise ValueError("one fast path, TUN queue and socket per worker")
        said = threading.Lock()

        def locked_report(direction: str, error: OSError) -> None:
            with said:  # the caller's rate limiter is not thread-safe
                report(direction, error)

        self.workers = [
            Worker(i, fp, tun, sock, locked_report, c_loop=c_loop)
            for i, (fp, tun, sock) in enumerate(zip(fastpaths, tun_fds, sock_fds, strict=True))
        ]

    def start(self) -> None:
        """Start every worker's thread."""
        for w in self.workers:
            w.start()

    def revive(self) -> list[int]:
        """Restart the workers whose thread died (a bug, logged by it); their indexes. The
        periodic check calls this, so a dead worker is a short gap, not a queue never read again."""
        dead = [w.index for w in self.workers if w.died]
        for i in dead:
            self.workers[i].restart()
        return dead

    def stop(self) -> None:
        """Stop and join every thread (the fds stay the caller's)."""
        for w in self.workers:
            w.stop()

    # ---- one FastPath's face ----

    def set_routes(self, routes: Mapping[IPv4Network, IPv4Address]) -> None:
        """The whole table, on every worker (see FastPath.set_routes)."""
        for w in self.workers:
            with w.holding():
                w.fastpath.set_routes(routes)

    def update_routes(self, removed: Iterable[IPv4Network], added: Mapping[IPv4Network, IPv4Address]) -> None:
        """One batch of changes on every worker, under each one's lock (see FastPath.update_routes)."""
        removed = list(removed)
        for w in self.workers:
            with w.holding():
                w.fastpath.update_routes(removed, added)

    def counters(self) -> Counters:
        """The sum over the workers (see ``sum_counters``)."""
        snapshots = []
        for w in self.workers:
            with w.holding():
                snapshots.append(w.fastpath.counters())
        return sum_counters(snapshots)

    def drops(self) -> list[Drop]:
        """Every worker's recent drops, oldest first (up to ``drop_ring`` per worker)."""
        rings = []
        for w in self.workers:
            with w.holding():
                rings.append(w.fastpath.drops())
        return merge_drops(rings)

    @property
    def drops_total(self) -> int:
        """Records ever written to the workers' drop rings, together."""
        total = 0
        for w in self.workers:
            with w.holding():
                total += w.fastpath.drops_total
        return total

    def __repr__(self) -> str:
        return f"WorkerPool({len(self.workers)} x {self.workers[0].fastpath!r})"


__all__ = ["ErrorReport", "Worker", "WorkerPool", "merge_drops", "sum_counters"]
