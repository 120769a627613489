"""The udp backend: IP packets from a TUN device, sent unchanged in UDP datagrams.

This is flannel's udp wire format (the inner IPv4 packet is the whole payload),
so a flannel udp node or ``socat`` can be a peer. The event loop only wakes the
C fast path: on readiness of either fd one C call drains up to a batch, so the
Python cost is paid per wakeup, not per packet.

Offload mode (the default; ``--no-offload`` turns it off) opens the TUN with
IFF_VNET_HDR and TSO4/checksum offloads and the socket with UDP_GRO, and sends
with UDP_SEGMENT, so one system call moves up to 64 KiB; on kernels 6.2+ the
TUN also takes USO, so UDP crosses it in trains too. The wire format stays
the same. Whatever the kernel refuses falls back, with one line in the log.

``--workers N`` (N > 1) moves the packets on N threads instead, each with a
queue of a multi-queue TUN and an SO_REUSEPORT socket of its own
(tunproxy.backends.udp_workers); the event loop then only changes routes and
reads counters. ``--workers 1`` is the event-loop path above, unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import struct
import time
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytun

from ..backend_config import UdpOptions, default_workers
from ..fastpath import (
    MAX_ROUTES,
    UDP_GRO,
    UDP_SEGMENT,
    VNET_HDR_LEN,
    FastPath,
    UdpGsoDisabled,
)
from ..leftovers import DEFAULT_TUN, Kept
from ..logonce import Said
from ..model import ConfigError, Lease, NetworkConfig
from ..netlink import delete_tun, ensure_address, link_index, replace_route, run_netlink
from .base import Backend, RouteTableFull
from .udp_workers import MultiQueueRefused, MultiQueueTun, WorkerPool, attach_flow_steering, bind_group

log = logging.getLogger(__name__)

IP_UDP_OVERHEAD = 20 + 8
SOCKET_BUFFER = 4 << 20  # cuts drops at the receiving socket; see bench/ and REFERENCE.md
TUN_TXQUEUELEN = 4096
ERROR_LOG_INTERVAL = 60.0
# linux/if_tun.h
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int); the argument is the value
TUNSETVNETHDRSZ = 0x400454D8  # _IOW('T', 216, int); the argument points to it
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_USO4 = 0x20  # since 6.2; drivers/net/tun.c takes USO4 only together with USO6
TUN_F_USO6 = 0x40


MIN_DEFAULT_ROUTES = 4096


# drain: the TUN is read for replies straight after a write, while that finds some; after
# REPLY_MISSES wake-ups in a row without one (the peer is an application, which answers later,
# not the kernel), once in REPLY_PROBE wake-ups, to notice when replies come back.
REPLY_MISSES = 4
REPLY_PROBE = 64


def now_ms() -> int:
    """The monotonic clock in milliseconds, the fast path's time (its ICMP rate limit, drop timestamps)."""
    return time.monotonic_ns() // 1_000_000


def default_max_routes(config: NetworkConfig) -> int:
    """Routes the udp backend holds by default: every SubnetLen subnet of the network, at least 4096.

    That covers every lease the network config lets hosts take, and leases
    outside SubnetMin-SubnetMax (reservations, older configs). Leases of
    other lengths can still exceed it; past the limit a lease is logged once
    and added when room frees. The table grows as it fills, so a large limit
    costs no memory until the peers are there.
    """
    subnets = 1 << (config.subnet_len - config.network.prefixlen)
    return min(MAX_ROUTES, max(MIN_DEFAULT_ROUTES, subnets))


def read_replies(misses: int) -> bool:
    """Whether to read the TUN straight after writing to it, given the wake-ups in a row (``misses``,
    from ``next_misses``) whose read found no reply or that did not read."""
    return misses < REPLY_MISSES or misses == REPLY_MISSES + REPLY_PROBE - 1


def next_misses(misses: int, found: bool) -> int:
    """``misses`` after one more wake-up: 0 once a reply was found, else one more, cycling through
    ``REPLY_MISSES .. REPLY_MISSES + REPLY_PROBE - 1`` so it stays small (no allocation)."""
    if found:
        return 0
    return misses + 1 if misses < REPLY_MISSES + REPLY_PROBE - 1 else REPLY_MISSES


class UdpBackend(Backend):
    """flannel's udp backend: a TUN device whose packets the C fast path sends to peers in UDP (port 8285)."""

    name = "udp"

    def __init__(self, ctx) -> None:  # type: ignore[no-untyped-def]
        super().__init__(ctx)
        flags = ctx.flags
        options = ctx.network.backend
        assert isinstance(options, UdpOptions)
        self.tun_name = flags.tun_name
        self.port, warning = flags.port_for(options)
        if warning:
            log.warning("%s", warning)
        self.batch = flags.batch
        self.offload = flags.offload
        self.allow_any_source = flags.allow_any_source
        self.max_routes = flags.max_routes or default_max_routes(ctx.network)
        self._routes: dict[IPv4Network, IPv4Address] = {}  # what the C table holds, by subnet
        self._udp_gso = self.offload
        self._uso = False  # the TUN took TUN_F_USO4|TUN_F_USO6 (set by _create_tun)
        self._mtu = ctx.underlay.mtu - IP_UDP_OVERHEAD
        self.tun: pytun.TunTapDevice | MultiQueueTun | None = None
        self.sock: socket.socket | None = None
        self.fastpath: FastPath | None = None
        # --workers: 1 is the event loop's readers below; more, a thread per TUN queue (udp_workers)
        self.workers = flags.workers or default_workers(len(os.sched_getaffinity(0)))
        if not flags.wants("multiqueue"):
            self.workers = 1
        self.socks: list[socket.socket] = []  # with workers: one per worker, self.sock is the first
        self.pool: WorkerPool | None = None
        self.subnet: IPv4Network | None = None
        self._readers = False
        self._errors_said = Said(repeat=ERROR_LOG_INTERVAL)
        self._drain = flags.wants("drain")
        self._reply_misses = 0

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
        self.tun = self._open_tun()
        if self.offload:
            try:
                fds = self.tun.fds if isinstance(self.tun, MultiQueueTun) else [self.tun.fileno()]
                for i, fd in enumerate(fds):  # every queue gets what the first one was granted
                    fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
                    if i == 0:
                        self._uso = self._set_tun_offloads(fd)
                    else:
                        uso = TUN_F_USO4 | TUN_F_USO6 if self._uso else 0
                        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | uso)
            except OSError as e:
                log.warning("TUN offloads refused (%s); offload mode off", e.strerror or e)
                self.tun.close()
                self.offload = self._udp_gso = self._uso = False
                self.tun = self._open_tun()

        def up(ipr):  # type: ignore[no-untyped-def]
            index = link_index(ipr, self.tun_name)
            ipr.link("set", index=index, mtu=self._mtu, txqlen=TUN_TXQUEUELEN, state="up")

        # IPv4 only, or the kernel sends IPv6 solicitations into the TUN. accept_local: the
        # ICMP errors the fast path writes come from the TUN's own address, which the kernel
        # would otherwise drop as a martian source.
        for knob in ("ipv6/conf/{}/disable_ipv6", "ipv4/conf/{}/accept_local"):
            with contextlib.suppress(OSError):
                Path("/proc/sys/net/" + knob.format(self.tun_name)).write_text("1")
        await run_netlink(up)

    async def check(self) -> None:
        """A TUN deleted behind our back (``ip link del``) is made again, with its address and route."""
        if self.tun is None or self.subnet is None:
            return
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

    def _set_tun_offloads(self, fd: int) -> bool:
        """TSO4 and checksum offload on TUN ``fd``, and USO too unless ``--without uso``; True if USO is on.

        drivers/net/tun.c (set_offload) turns on NETIF_F_GSO_UDP_L4 only for
        TUN_F_USO4 and TUN_F_USO6 together, and a kernel before 6.2 refuses
        bits it does not know with EINVAL: then TSO4 and checksum alone, with
        one line in the log (``--refuse uso`` takes that path on any kernel).
        OSError if even TSO4 and checksum are refused.
        """
        base = TUN_F_CSUM | TUN_F_TSO4
        flags = self.ctx.flags
        if flags.wants("uso"):
            reason = "--refuse uso" if "uso" in flags.refuse else None
            if reason is None:
                try:
                    fcntl.ioctl(fd, TUNSETOFFLOAD, base | TUN_F_USO4 | TUN_F_USO6)
                    return True
                except OSError as e:
                    reason = e.strerror or str(e)
            log.warning("TUN USO refused (%s); UDP crosses the TUN a datagram at a time", reason)
        fcntl.ioctl(fd, TUNSETOFFLOAD, base)
        return False

    def _open_tun(self) -> pytun.TunTapDevice | MultiQueueTun:
        if self.workers > 1:
            try:
                if "multiqueue" in self.ctx.flags.refuse:
                    raise MultiQueueRefused(errno.EINVAL, "IFF_MULTI_QUEUE refused (--refuse multiqueue)")
                return MultiQueueTun(self.tun_name, self.workers, self.offload)
            except MultiQueueRefused as e:
                log.warning("%s; one worker, on the event loop", e.strerror)
                self.workers = 1
            except OSError as e:
                raise ConfigError(f"cannot create TUN device {self.tun_name!r}: {e.strerror}") from None
        flags = pytun.IFF_TUN | pytun.IFF_NO_PI | (pytun.IFF_VNET_HDR if self.offload else 0)
        try:
            tun = pytun.TunTapDevice(name=self.tun_name, flags=flags)
        except pytun.Error as e:
            raise ConfigError(f"cannot create TUN device {self.tun_name!r}: {e}") from None
        # pytun opens without O_CLOEXEC and blocking; the C path needs EAGAIN, children need nothing.
        fd = tun.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
        os.set_blocking(fd, False)
        return tun

    def _udp_offloads(self, sock: socket.socket) -> None:
        """UDP_GRO on; UDP_SEGMENT only if the kernel knows it (else it would send one huge datagram)."""
        gro = "on"
        try:
            sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
        except OSError as e:
            gro = f"refused ({e.strerror})"
        try:
            sock.getsockopt(socket.SOL_UDP, UDP_SEGMENT)
            gso = "on"
        except OSError as e:
            self._udp_gso = False
            gso = f"refused ({e.strerror})"
        uso = "on" if self._uso else "off"
        log.info("offload: TUN TSO4 and checksum on, UDP GSO %s, UDP GRO %s, TUN USO %s", gso, gro, uso)

    def _bind_socket(self, reuseport: bool = False) -> socket.socket:
        addr = str(self.ctx.underlay.address)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            if reuseport:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((addr, self.port))
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"UDP port {self.port} on {addr} is already in use") from None
            raise ConfigError(f"cannot bind UDP {addr}:{self.port}: {e.strerror}") from None
        sock.setblocking(False)
        for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # SO_*BUFFORCE
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
        return sock

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
            if self.workers > 1:
                assert isinstance(self.tun, MultiQueueTun)
                self._start_workers(paths, self.tun.fds)
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
            replace_route(ipr, dst=str(network), oif=index, scope=253, prefsrc=str(local))

        await run_netlink(configure)

    def _new_fastpath(self, local: IPv4Address) -> FastPath:
        return FastPath(
            mtu=self._mtu,
            local_addr=local,
            port=self.port,
            batch=self.batch,
            offload=self.offload,
            udp_gso=self._udp_gso,
            uso=self._uso,
            max_routes=self.max_routes,
            drop_ring=self.ctx.flags.drop_ring,
            allow_any_source=self.allow_any_source,
            fast_csum=self.ctx.flags.wants("fast-csum"),
            simd="fast-csum" not in self.ctx.flags.refuse,  # refused: as on a CPU without AVX2
        )

    # ---- --workers N > 1 (tunproxy.backends.udp_workers); the readers below are --workers 1 ----

    def _bind_workers(self) -> None:
        self.socks = bind_group(self._bind_socket, self.workers)
        self.sock = self.socks[0]
        steering = "off (--without flow-steering)"
        if self.ctx.flags.wants("flow-steering"):
            try:
                if "flow-steering" in self.ctx.flags.refuse:
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

    def _start_workers(self, paths: Sequence[FastPath], tun_fds: Sequence[int]) -> None:
        self.pool = WorkerPool(paths, tun_fds, [s.fileno() for s in self.socks], self._worker_error)
        # The pool has FastPath's face for routes, counters and drops (what apply, stats and the
        # observers use); _on_tun/_on_udp, the only callers of the packet methods, never run with it.
        self.fastpath = self.pool  # type: ignore[assignment]
        self.pool.start()

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
        assert isinstance(self.tun, MultiQueueTun)
        self._start_workers(paths, self.tun.fds)

    def _worker_error(self, direction: str, error: OSError) -> None:
        """A worker's failed C call (called from its thread, one at a time): as _on_tun/_on_udp say it."""
        if isinstance(error, UdpGsoDisabled):
            self._udp_gso = False
            log.warning("%s: %s", self._path(direction), error.strerror)
        else:
            self._log_error(direction, error)

    def _on_tun(self) -> None:
        fp, tun, sock = self.fastpath, self.tun, self.sock
        assert fp and tun and sock
        self._tun_to_udp(fp, tun.fileno(), sock.fileno(), now_ms())

    def _on_udp(self) -> None:
        fp, tun, sock = self.fastpath, self.tun, self.sock
        assert fp and tun and sock
        tun_fd, udp_fd, now = tun.fileno(), sock.fileno(), now_ms()
        try:
            received = fp.udp_to_tun(udp_fd, tun_fd, now)
        except OSError as e:
            self._log_error("udp->tun", e)
            return
        if received and self._drain:
            # The kernel handles a packet written to the TUN within the write, so a reply it makes
            # itself (a TCP ACK, an echo reply) is queued on the TUN already: send it now, without
            # an epoll round trip. An application's reply comes later: skip the read while it finds none.
            misses = self._reply_misses
            found = read_replies(misses) and self._tun_to_udp(fp, tun_fd, udp_fd, now) > 0
            self._reply_misses = next_misses(misses, found)

    def _tun_to_udp(self, fp: FastPath, tun_fd: int, udp_fd: int, now: int) -> int:
        """One batch from the TUN to the peers: the packets read (0 after an error, which is logged)."""
        try:
            return fp.tun_to_udp(tun_fd, udp_fd, now)
        except UdpGsoDisabled as e:  # raised once; the datagrams went out one by one
            self._udp_gso = False
            log.warning("%s: %s", self._path("tun->udp"), e.strerror)
            return e.count
        except OSError as e:  # the data path must not die; the counters say what was lost
            self._log_error("tun->udp", e)
            return 0

    def _path(self, direction: str) -> str:
        """``tun->udp (tunproxy0 -> UDP 192.0.2.11:8285)``: a data path error names its device and socket."""
        sock = f"UDP {self.ctx.underlay.address}:{self.port}"
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
        await self.apply((lease,), ())

    async def apply(self, removed: Sequence[Lease], added: Sequence[Lease]) -> list[tuple[Lease, Exception]]:
        """One replacement of the C route table for the whole burst: O(table + burst) in C, O(burst) here.

        Additions past ``max_routes`` come back as ``RouteTableFull``; the
        daemon retries them when a later change or the periodic check runs.
        """
        gone = {lease.subnet for lease in removed if lease.subnet in self._routes}
        size = len(self._routes) - len(gone)
        fresh: dict[IPv4Network, IPv4Address] = {}
        failures: list[tuple[Lease, Exception]] = []
        for lease in added:
            replacing = lease.subnet in fresh or (lease.subnet in self._routes and lease.subnet not in gone)
            if not replacing:
                if size >= self.max_routes:
                    failures.append((lease, RouteTableFull(f"route table full ({self.max_routes} routes)")))
                    continue
                size += 1
            fresh[lease.subnet] = lease.public_ip
        if self.fastpath is not None:
            self.fastpath.update_routes(gone, fresh)
        for subnet in gone:
            del self._routes[subnet]
        self._routes.update(fresh)
        return failures

    def stats(self) -> str | None:
        """The fast path's counter summary; None before ``set_subnet``."""
        return self.fastpath.counters().summary() if self.fastpath else None

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
