"""The udp backend: IP packets from a TUN device, sent unchanged in UDP datagrams.

This is flannel's udp wire format (the inner IPv4 packet is the whole payload),
so a flannel udp node or ``socat`` can be a peer. The packets never pass
through Python: by default (the "c-loop") a thread waits in epoll inside the C
fast path and moves both directions there, so a wake-up costs no Python
either; the event loop only changes routes and reads counters. With
``--without c-loop`` the event loop wakes the C instead: on readiness of
either fd one C call drains up to a batch, so Python is paid per wake-up.

Offload mode (the default; ``--no-offload`` turns it off) opens the TUN with
IFF_VNET_HDR and TSO4/checksum offloads and the socket with UDP_GRO, and sends
with UDP_SEGMENT, so one system call moves up to 64 KiB; on kernels 6.2+ the
TUN also takes USO, so UDP crosses it in trains too. The wire format stays
the same. Whatever the kernel refuses falls back, with one line in the log.

``--workers N`` (N > 1) moves the packets on N threads, each with a queue of
a multi-queue TUN and an SO_REUSEPORT socket of its own
(tunproxy.backends.udp_workers); the c-loop with one worker is one such
thread on the one queue and socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network

import pytun

from ..backend_config import UdpOptions, UdpSettings
from ..counters import Counters, Drop
from ..fastpath import UDP_GRO, FastPath, UdpGsoDisabled, now_ms
from ..leftovers import DEFAULT_TUN, Kept
from ..logonce import REPEAT_EVERY, Said
from ..model import ConfigError, Lease
from ..netlink import RT_SCOPE_LINK, delete_tun, ensure_address, link_index, replace_route, run_netlink
from .base import Backend, BackendContext
from .rules import fit_routes
from .udp_devices import (
    MultiQueueTun,
    attach_flow_steering,
    bind_group,
    bind_socket,
    bring_up,
    open_tun,
    set_tun_offloads,
    tun_fds,
    udp_offloads,
)
from .udp_workers import WorkerPool

log = logging.getLogger(__name__)

IP_UDP_OVERHEAD = 20 + 8


class UdpBackend(Backend):
    """flannel's udp backend: a TUN device whose packets the C fast path sends to peers in UDP (port 8285)."""

    name = "udp"

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        options, network = ctx.network.backend, ctx.network
        assert isinstance(options, UdpOptions)
        subnets = 1 << (network.subnet_len - network.network.prefixlen)
        s = self.settings = UdpSettings.resolve(
            options, ctx.flags, cpus=len(os.sched_getaffinity(0)), subnets=subnets
        )
        for warning in s.warnings:
            log.warning("%s", warning)
        self.tun_name, self.port, self.max_routes = s.tun_name, s.port, s.max_routes
        self.offload = s.offload  # from here on, what the kernel granted
        self._routes: dict[IPv4Network, IPv4Address] = {}  # what the C table holds, by subnet
        self._udp_gso = self.offload
        self._uso = False  # the TUN took TUN_F_USO4|TUN_F_USO6 (set by _create_tun)
        self._mtu = ctx.underlay.mtu - IP_UDP_OVERHEAD
        self.tun: pytun.TunTapDevice | MultiQueueTun | None = None
        self.sock: socket.socket | None = None
        self.fastpath: FastPath | None = None
        # --workers: a thread per TUN queue (udp_workers); one worker is a thread too with the
        # c-loop, else the event loop's readers below. What the kernel granted, from here on.
        self.workers = s.workers
        self.socks: list[socket.socket] = []  # with workers: one per worker, self.sock is the first
        self.pool: WorkerPool | None = None
        self.subnet: IPv4Network | None = None
        self._readers = False
        self._errors_said = Said(repeat=REPEAT_EVERY)

    @property
    def mtu(self) -> int:
        """The underlay's MTU less 28 (IPv4 and UDP headers), as flannel's udp backend."""
        return self._mtu

    async def open(self) -> None:
        """Makes the TUN (deleting any link of that name first) and binds UDP on the underlay address.

        ConfigError if /dev/net/tun is missing, the TUN cannot be created or the
        port cannot be bound.
        """
        if not os.path.exists("/dev/net/tun"):
            raise ConfigError("/dev/net/tun is missing (modprobe tun, or give the container the device)")
        await asyncio.to_thread(delete_tun, self.tun_name)  # a leftover from a killed run
        await self._create_tun()
        if self.workers > 1:
            self._bind_workers()
        else:
            self.sock = self._bind_socket()
        if self.offload:
            assert self.sock is not None
            self._udp_offloads(self.sock)
            for sock in self.socks[1:]:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)

    async def _create_tun(self) -> None:
        s = self.settings
        self.tun, self.workers = open_tun(self.tun_name, self.offload, self.workers, s.refuse)
        if self.offload:
            try:
                self._uso = set_tun_offloads(tun_fds(self.tun), s.uso, "uso" in s.refuse)
            except OSError as e:
                log.warning("TUN offloads refused (%s); offload mode off", e.strerror or e)
                self.tun.close()
                self.offload = self._udp_gso = self._uso = False
                self.tun, self.workers = open_tun(self.tun_name, False, self.workers, s.refuse)
        await bring_up(self.tun_name, self._mtu)

    async def check(self) -> None:
        """A TUN deleted behind our back (``ip link del``) is made again, with its address and route;
        a worker thread that died is started again."""
        if self.tun is None or self.subnet is None:
            return
        if self.pool is not None:
            for index in self.pool.revive():
                log.error("worker %d had stopped; started it again", index)
        if await run_netlink(lambda ipr: link_index(ipr, self.tun_name)) is not None:
            return
        log.warning("TUN device %s was deleted; creating it again", self.tun_name)
        if self.pool is not None:
            await self._recreate_tun_for_workers()
            return
        asyncio.get_running_loop().remove_reader(self.tun.fileno())
        self.tun.close()
        await self._create_tun()
        await self._configure(self.subnet)
        asyncio.get_running_loop().add_reader(self.tun.fileno(), self._on_tun)

    def _udp_offloads(self, sock: socket.socket) -> None:
        gso, said = udp_offloads(sock)
        self._udp_gso = self._udp_gso and gso
        log.info("offload: TUN TSO4 and checksum on, %s, TUN USO %s", said, "on" if self._uso else "off")

    def _bind_socket(self, reuseport: bool = False) -> socket.socket:
        return bind_socket(self.ctx.underlay.address, self.port, reuseport)

    async def set_subnet(self, subnet: IPv4Network) -> None:
        """Builds the fast path for ``subnet`` (its first address on the TUN, as flannel) and starts it."""
        assert self.tun and self.sock
        local = subnet.network_address  # flannel's choice: the subnet's first address on the tun
        if self.fastpath is None or self.subnet != subnet:
            self._stop_workers()
            paths = [self._new_fastpath(local) for _ in range(self.workers)]
            for fastpath in paths:
                fastpath.set_routes(self._routes)
            self.fastpath = paths[0]
            if self.offload:
                fp = paths[0]
                csum = ("on, AVX2" if fp.csum_simd else "on, portable") if fp.fast_csum else "off"
                log.info("send path: fast-csum %s", csum)
            if self.workers > 1 or self.settings.c_loop:
                self._start_workers(paths, tun_fds(self.tun))
            if self.subnet is None:  # said once, at the first subnet
                log.info("data path: %s", self._data_path())
        self.subnet = subnet
        await self._configure(subnet)
        if not self._readers and self.pool is None:
            loop = asyncio.get_running_loop()
            loop.add_reader(self.tun.fileno(), self._on_tun)
            loop.add_reader(self.sock.fileno(), self._on_udp)
            self._readers = True

    async def _configure(self, subnet: IPv4Network) -> None:
        local, network = subnet.network_address, self.ctx.network.network

        def configure(ipr):  # type: ignore[no-untyped-def]
            index = link_index(ipr, self.tun_name)
            ensure_address(ipr, index, local, 32)
            replace_route(ipr, dst=str(network), oif=index, scope=RT_SCOPE_LINK, prefsrc=str(local))

        await run_netlink(configure)

    def _new_fastpath(self, local: IPv4Address) -> FastPath:
        s = self.settings
        return FastPath(
            mtu=self._mtu,
            local_addr=local,
            port=self.port,
            batch=s.batch,
            offload=self.offload,
            udp_gso=self._udp_gso,
            uso=self._uso,
            max_routes=self.max_routes,
            drop_ring=s.drop_ring,
            allow_any_source=s.allow_any_source,
            fast_csum=s.fast_csum,
            simd=s.simd,
            drain=s.drain,
        )

    # ---- worker threads (tunproxy.backends.udp_workers); the readers below: --without c-loop ----

    def _bind_workers(self) -> None:
        self.socks = bind_group(self._bind_socket, self.workers)
        self.sock = self.socks[0]
        steering = "off (--without flow-steering)"
        if self.settings.flow_steering:
            try:
                if "flow-steering" in self.settings.refuse:
                    raise OSError(errno.EPERM, "refused (--refuse flow-steering)")
                attach_flow_steering(self.sock, self.workers)
                steering = "on"
            except OSError as e:
                steering = f"refused ({e.strerror}): the kernel's hash of the outer addresses"
        log.info(
            "workers: %d, each with a TUN queue, a UDP socket (SO_REUSEPORT) and a thread; flow steering %s",
            self.workers,
            steering,
        )

    def _start_workers(self, paths: Sequence[FastPath], fds: Sequence[int]) -> None:
        assert self.sock is not None
        socks = [s.fileno() for s in self.socks or [self.sock]]
        self.pool = WorkerPool(paths, fds, socks, self._worker_error, c_loop=self.settings.c_loop)
        # The pool has FastPath's face for routes, counters and drops (what apply, stats and the
        # observers use); _on_tun/_on_udp, the only callers of the packet methods, never run with it.
        self.fastpath = self.pool  # type: ignore[assignment]
        self.pool.start()

    def _data_path(self) -> str:
        """Who waits for packets and calls the C, and whether it drains, for the start-up line."""
        if self.settings.c_loop:
            who = "c-loop (threads waiting in C)"
        elif self.workers > 1:
            who = "each worker's thread wakes the C"
        else:
            who = "the event loop wakes the C"
        return f"{who}, drain {'on' if self.settings.drain else 'off'}"

    def _stop_workers(self) -> None:
        """End and join every worker thread (the fds stay open)."""
        if self.pool is not None:
            self.pool.stop()
            self.pool = None

    async def _recreate_tun_for_workers(self) -> None:
        assert self.pool is not None and self.tun is not None and self.subnet is not None
        paths = [w.fastpath for w in self.pool.workers]
        self._stop_workers()
        self.tun.close()
        await self._create_tun()
        await self._configure(self.subnet)
        self._start_workers(paths, tun_fds(self.tun))

    def _worker_error(self, direction: str, error: OSError) -> None:
        """A failed C call, from a worker's thread (one at a time) or _on_tun/_on_udp: a refused
        UDP GSO once (the datagrams went out one by one), anything else once a minute."""
        if isinstance(error, UdpGsoDisabled):  # refused while sending, in whichever call (drain, c-loop)
            if self._udp_gso:  # each worker's fast path finds out for itself: say it once
                log.warning("%s: %s", self._path("tun->udp"), error.strerror)
            self._udp_gso = False
        else:
            self._log_error(direction, error)

    def _on_tun(self) -> None:
        fp, tun, sock = self.fastpath, self.tun, self.sock
        assert fp and tun and sock
        try:
            fp.tun_to_udp(tun.fileno(), sock.fileno(), now_ms())
        except OSError as e:  # the data path must not die; the counters say what was lost
            self._worker_error("tun->udp", e)

    def _on_udp(self) -> None:
        fp, tun, sock = self.fastpath, self.tun, self.sock
        assert fp and tun and sock
        try:  # with drain, the kernel's replies go out in this call too
            fp.udp_to_tun(sock.fileno(), tun.fileno(), now_ms())
        except OSError as e:
            self._worker_error("udp->tun", e)

    def _path(self, direction: str) -> str:
        """``tun->udp (tunproxy0 -> UDP 192.0.2.11:8285)``: a data path error names its device and socket
        (``c-loop (tunproxy0 <-> UDP ...)`` for the C loop, which moves both ways)."""
        sock = f"UDP {self.ctx.underlay.address}:{self.port}"
        if direction == "c-loop":
            return f"{direction} ({self.tun_name} <-> {sock})"
        ends = (self.tun_name, sock) if direction == "tun->udp" else (sock, self.tun_name)
        return f"{direction} ({ends[0]} -> {ends[1]})"

    def _log_error(self, direction: str, error: OSError) -> None:
        """One line per direction and errno a minute: a persistent error must not flood the log."""
        if self._errors_said.due((direction, error.errno), now=time.monotonic()):
            log.error("%s: %s", self._path(direction), error)

    async def add_peer(self, lease: Lease) -> None:
        """``apply`` with one lease: RouteTableFull when ``max_routes`` routes are in use."""
        for _, error in await self.apply((), (lease,)):
            raise error

    async def remove_peer(self, lease: Lease) -> None:
        """One-lease ``apply``: the route goes from the C table, and its peer with its last route."""
        await self.apply((lease,), ())

    async def apply(self, removed: Sequence[Lease], added: Sequence[Lease]) -> list[tuple[Lease, Exception]]:
        """One ``fp_update_routes`` call for the whole burst: it costs the burst, not the table.

        Additions past ``max_routes`` come back as ``RouteTableFull``; the
        daemon retries them when a later change or the periodic check runs.
        """
        gone, fresh, failures = fit_routes(self._routes, removed, added, self.max_routes)
        if self.fastpath is not None:
            self.fastpath.update_routes(gone, fresh)
        for subnet in gone:
            del self._routes[subnet]
        self._routes.update(fresh)
        return failures

    def counters(self) -> Counters | None:
        """The fast path's counters (every worker's, summed); None before ``set_subnet``."""
        return self.fastpath.counters() if self.fastpath else None

    def drop_ring(self) -> tuple[int, list[Drop]] | None:
        """The fast path's drop ring (every worker's, merged); None before ``set_subnet``."""
        return (self.fastpath.drops_total, self.fastpath.drops()) if self.fastpath else None

    def kept(self) -> Kept:
        """Our TUN and the network's route through it."""
        routes = frozenset({(self.ctx.network.network, self.tun_name)})
        return Kept(routes=routes, devices=frozenset({self.tun_name}), tun_names=(DEFAULT_TUN, self.tun_name))

    async def close(self) -> None:
        """Stops the workers, closes the sockets and the TUN; the kernel then deletes the TUN with
        its address and route."""
        self._stop_workers()
        if self._readers:
            loop = asyncio.get_running_loop()
            if self.tun:
                loop.remove_reader(self.tun.fileno())
            if self.sock:
                loop.remove_reader(self.sock.fileno())
            self._readers = False
        for sock in self.socks:
            sock.close()
        self.socks = []
        if self.sock:
            self.sock.close()
            self.sock = None
        if self.tun:
            # Closing the only fd of a non-persistent TUN deletes it, with its address and routes.
            self.tun.close()
            self.tun = None


BACKEND = UdpBackend
