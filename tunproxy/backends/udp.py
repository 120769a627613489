"""The udp backend: IP packets from a TUN device, sent unchanged in UDP datagrams.

This is flannel's udp wire format (the inner IPv4 packet is the whole payload),
so a flannel udp node or ``socat`` can be a peer. The event loop only wakes the
C fast path: on readiness of either fd one C call drains up to a batch, so the
Python cost is paid per wakeup, not per packet.

Offload mode (the default; ``--no-offload`` turns it off) opens the TUN with
IFF_VNET_HDR and TSO4/checksum offloads and the socket with UDP_GRO, and sends
with UDP_SEGMENT, so one system call moves up to 64 KiB; the wire format stays
the same. Whatever the kernel refuses falls back, with one line in the log.
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

from ..backend_config import UdpOptions
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
from ..netlink import delete_link, ensure_address, link_index, replace_route, run_netlink
from .base import Backend, RouteTableFull

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


MIN_DEFAULT_ROUTES = 4096


# drain: the TUN is read for replies straight after a write, while that finds some; after
# REPLY_MISSES wake-ups in a row without one (the peer is an application, which answers later,
# not the kernel), once in REPLY_PROBE wake-ups, to notice when replies come back.
REPLY_MISSES = 4
REPLY_PROBE = 64


def now_ms() -> int:
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
        self._mtu = ctx.underlay.mtu - IP_UDP_OVERHEAD
        self.tun: pytun.TunTapDevice | None = None
        self.sock: socket.socket | None = None
        self.fastpath: FastPath | None = None
        self.subnet: IPv4Network | None = None
        self._readers = False
        self._errors_said = Said(repeat=ERROR_LOG_INTERVAL)
        self._drain = flags.wants("drain")
        self._reply_misses = 0

    @property
    def mtu(self) -> int:
        return self._mtu

    async def open(self) -> None:
        if not os.path.exists("/dev/net/tun"):
            raise ConfigError("/dev/net/tun is missing (modprobe tun, or give the container the device)")
        await asyncio.to_thread(delete_link, self.tun_name)  # a leftover from a killed run
        await self._create_tun()
        self.sock = self._bind_socket()
        if self.offload:
            self._udp_offloads(self.sock)

    async def _create_tun(self) -> None:
        self.tun = self._open_tun()
        if self.offload:
            try:
                fd = self.tun.fileno()
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
                fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4)
            except OSError as e:
                log.warning("TUN offloads refused (%s); offload mode off", e.strerror or e)
                self.tun.close()
                self.offload = self._udp_gso = False
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
        asyncio.get_running_loop().remove_reader(self.tun.fileno())
        self.tun.close()
        await self._create_tun()
        await self._configure(self.subnet)
        asyncio.get_running_loop().add_reader(self.tun.fileno(), self._on_tun)

    def _open_tun(self) -> pytun.TunTapDevice:
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
        log.info("offload: TUN TSO4 and checksum on, UDP GSO %s, UDP GRO %s", gso, gro)

    def _bind_socket(self) -> socket.socket:
        addr = str(self.ctx.underlay.address)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
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
        assert self.tun and self.sock
        local = subnet.network_address  # flannel's choice: the subnet's first address on the tun
        if self.fastpath is None or self.subnet != subnet:
            self.fastpath = FastPath(
                mtu=self._mtu,
                local_addr=local,
                port=self.port,
                batch=self.batch,
                offload=self.offload,
                udp_gso=self._udp_gso,
                max_routes=self.max_routes,
                drop_ring=self.ctx.flags.drop_ring,
                allow_any_source=self.allow_any_source,
            )
            self.fastpath.set_routes(self._routes)
        self.subnet = subnet
        await self._configure(subnet)
        if not self._readers:
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
        return self.fastpath.counters().summary() if self.fastpath else None

    def kept(self) -> Kept:
        routes = frozenset({(self.ctx.network.network, self.tun_name)})
        return Kept(routes=routes, devices=frozenset({self.tun_name}), tun_names=(DEFAULT_TUN, self.tun_name))

    async def close(self) -> None:
        if self._readers:
            loop = asyncio.get_running_loop()
            if self.tun:
                loop.remove_reader(self.tun.fileno())
            if self.sock:
                loop.remove_reader(self.sock.fileno())
            self._readers = False
        if self.sock:
            self.sock.close()
            self.sock = None
        if self.tun:
            # Closing the only fd of a non-persistent TUN deletes it, with its address and routes.
            self.tun.close()
            self.tun = None


BACKEND = UdpBackend
