"""The udp backend's devices: the TUN and the UDP sockets, with the offloads the kernel grants.

Each function asks the kernel for the most it may give and falls back, with
one line in the log, to what it does give: a multi-queue TUN, else one queue;
TSO4 and checksum offload plus USO, else TSO4 and checksum alone; UDP GSO and
GRO on the socket, else without. ``--refuse NAME`` takes a fallback as if the
kernel had refused. Blocking calls on file descriptors only (netlink goes
through ``run_netlink``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import socket
import struct
from collections.abc import Callable, Collection, Sequence
from ipaddress import IPv4Address
from pathlib import Path
from typing import TypeAlias

import pytun

from ..fastpath import UDP_GRO, UDP_SEGMENT, VNET_HDR_LEN
from ..model import ConfigError
from ..netlink import link_index, run_netlink
from .udp_steering import flow_steering_program

log = logging.getLogger("tunproxy.backends.udp")

SOCKET_BUFFER = 4 << 20  # cuts drops at the receiving socket (README, "Speed-ups"); more changed nothing
TUN_TXQUEUELEN = 4096  # 1,000 lost packets at the TUN under a 64-byte flood; 16,384 changed nothing
# linux/if_tun.h
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
IFREQ_SIZE = 40  # struct ifreq: the name, then a 24-byte union (ifr_flags is its first short)
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int); the argument is the value
TUNSETVNETHDRSZ = 0x400454D8  # _IOW('T', 216, int); the argument points to it
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_USO4 = 0x20  # since 6.2; drivers/net/tun.c takes USO4 only together with USO6
TUN_F_USO6 = 0x40
# asm-generic/socket.h
SO_ATTACH_REUSEPORT_CBPF = 51

Tun: TypeAlias = "pytun.TunTapDevice | MultiQueueTun"


def ifreq(name: str, flags: int) -> bytes:
    """``struct ifreq`` for TUNSETIFF: ``name`` (1 to 15 bytes, else ValueError) and ``ifr_flags``."""
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ:
        raise ValueError(f"interface name {name!r} must be 1 to {IFNAMSIZ - 1} bytes")
    return struct.pack(f"{IFNAMSIZ}sH", raw, flags).ljust(IFREQ_SIZE, b"\0")


class MultiQueueRefused(OSError):
    """The kernel would not open the TUN with IFF_MULTI_QUEUE (or it was refused with ``--refuse``)."""


class MultiQueueTun:
    """A TUN device opened as ``queues`` fds (IFF_MULTI_QUEUE), each non-blocking and close-on-exec.

    ``fds[i]`` is queue ``i``; ``fileno()`` is queue 0, so code written for
    one fd (the offload ioctls are applied to each fd by the caller) finds
    one. The device is not persistent: closing every fd deletes it, with
    its addresses and routes. Raises ``MultiQueueRefused`` if the first
    TUNSETIFF fails with EINVAL (a kernel without multi-queue TUN), OSError
    for anything else.
    """

    def __init__(self, name: str, queues: int, vnet_hdr: bool) -> None:
        flags = IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE | (IFF_VNET_HDR if vnet_hdr else 0)
        request = ifreq(name, flags)
        self.name = name
        self.fds: list[int] = []
        try:
            for _ in range(queues):
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
                self.fds.append(fd)
                try:
                    fcntl.ioctl(fd, TUNSETIFF, request)
                except OSError as e:
                    if e.errno == errno.EINVAL and len(self.fds) == 1:
                        raise MultiQueueRefused(e.errno, f"IFF_MULTI_QUEUE refused: {e.strerror}") from None
                    raise
        except BaseException:
            self.close()
            raise

    def fileno(self) -> int:
        """The first queue's fd, for code that expects one TUN."""
        return self.fds[0]

    def close(self) -> None:
        """Close every queue; the kernel deletes the device with the last one."""
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


def bind_group(bind: Callable[[bool], socket.socket], count: int) -> list[socket.socket]:
    """``count`` sockets on one address and port, with SO_REUSEPORT; ``bind(reuseport)`` makes one.

    A first, plain bind proves the port is free (and raises the caller's
    "already in use" error otherwise): without it a second tunproxy of the
    same user would silently join the group and take a share of the
    datagrams. Socket ``i`` is index ``i`` of the kernel's group (it keeps
    bind order), which ``flow_steering_program`` returns.
    """
    bind(False).close()
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(bind(True))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def attach_flow_steering(sock: socket.socket, workers: int) -> None:
    """Attach ``flow_steering_program(workers)`` to ``sock``'s SO_REUSEPORT group; OSError if refused."""
    insns = flow_steering_program(workers)
    raw = b"".join(struct.pack("HBBI", *insn) for insn in insns)
    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = struct.pack("HxxxxxxQ", len(insns), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def open_tun(name: str, vnet: bool, queues: int, refuse: Collection[str]) -> tuple[Tun, int]:
    """The TUN ``name`` (non-blocking, close-on-exec) and how many queues it got.

    ``queues`` > 1 asks for IFF_MULTI_QUEUE; refused (or ``multiqueue`` in
    ``refuse``), one queue, with one log line. ``vnet``: IFF_VNET_HDR.
    ConfigError naming the device if it cannot be made.
    """
    if queues > 1:
        try:
            if "multiqueue" in refuse:
                raise MultiQueueRefused(errno.EINVAL, "IFF_MULTI_QUEUE refused (--refuse multiqueue)")
            return MultiQueueTun(name, queues, vnet), queues
        except MultiQueueRefused as e:
            log.warning("%s; one worker", e.strerror)
        except OSError as e:
            raise ConfigError(f"cannot create TUN device {name!r}: {e.strerror}") from None
    flags = pytun.IFF_TUN | pytun.IFF_NO_PI | (pytun.IFF_VNET_HDR if vnet else 0)
    try:
        tun = pytun.TunTapDevice(name=name, flags=flags)
    except pytun.Error as e:
        raise ConfigError(f"cannot create TUN device {name!r}: {e}") from None
    # pytun opens without O_CLOEXEC and blocking; the C path needs EAGAIN, children need nothing.
    fd = tun.fileno()
    fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
    os.set_blocking(fd, False)
    return tun, 1


def tun_fds(tun: Tun) -> Sequence[int]:
    """Every queue's file descriptor (one for a single-queue TUN)."""
    return tun.fds if isinstance(tun, MultiQueueTun) else [tun.fileno()]


def set_tun_offloads(fds: Sequence[int], want_uso: bool, refuse_uso: bool) -> bool:
    """virtio_net_hdrs, TSO4 and checksum offload on every queue, and USO if wanted; True if USO is on.

    drivers/net/tun.c (set_offload) turns on NETIF_F_GSO_UDP_L4 only for
    TUN_F_USO4 and TUN_F_USO6 together, and a kernel before 6.2 refuses bits
    it does not know with EINVAL: then TSO4 and checksum alone, with one line
    in the log (``refuse_uso`` takes that path on any kernel). Every queue
    gets what the first was granted. OSError if even TSO4 and checksum are
    refused (offload mode is then off).
    """
    base = TUN_F_CSUM | TUN_F_TSO4
    uso = False
    for i, fd in enumerate(fds):
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        if i:
            fcntl.ioctl(fd, TUNSETOFFLOAD, base | (TUN_F_USO4 | TUN_F_USO6 if uso else 0))
            continue
        if want_uso:
            reason = "--refuse uso" if refuse_uso else None
            if reason is None:
                try:
                    fcntl.ioctl(fd, TUNSETOFFLOAD, base | TUN_F_USO4 | TUN_F_USO6)
                    uso = True
                    continue
                except OSError as e:
                    reason = e.strerror or str(e)
            log.warning("TUN USO refused (%s); UDP crosses the TUN a datagram at a time", reason)
        fcntl.ioctl(fd, TUNSETOFFLOAD, base)
    return uso


async def bring_up(name: str, mtu: int) -> None:
    """The TUN up with its MTU and queue length, IPv4 only, accepting its own address as a source.

    IPv4 only, or the kernel sends IPv6 solicitations into the TUN.
    accept_local: the ICMP errors the fast path writes come from the TUN's
    own address, which the kernel would otherwise drop as a martian source.
    """
    for knob in ("ipv6/conf/{}/disable_ipv6", "ipv4/conf/{}/accept_local"):
        with contextlib.suppress(OSError):
            Path("/proc/sys/net/" + knob.format(name)).write_text("1")

    def up(ipr):  # type: ignore[no-untyped-def]
        index = link_index(ipr, name)
        ipr.link("set", index=index, mtu=mtu, txqlen=TUN_TXQUEUELEN, state="up")

    await run_netlink(up)


def udp_offloads(sock: socket.socket) -> tuple[bool, str]:
    """UDP_GRO on; whether UDP_SEGMENT may be used (only if the kernel knows it, else it would
    send one huge datagram); and a log fragment saying what the socket took."""
    gro = "on"
    try:
        sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
    except OSError as e:
        gro = f"refused ({e.strerror})"
    try:
        sock.getsockopt(socket.SOL_UDP, UDP_SEGMENT)
    except OSError as e:
        return False, f"UDP GSO refused ({e.strerror}), UDP GRO {gro}"
    return True, f"UDP GSO on, UDP GRO {gro}"


def bind_socket(address: IPv4Address, port: int, reuseport: bool = False) -> socket.socket:
    """A non-blocking UDP socket bound to ``address:port`` with 4 MiB buffers (forced past the
    sysctl limits where root may). ConfigError naming the address and port if it cannot bind."""
    addr = str(address)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((addr, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"UDP port {port} on {addr} is already in use") from None
        raise ConfigError(f"cannot bind UDP {addr}:{port}: {e.strerror}") from None
    sock.setblocking(False)
    for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # SO_*BUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
    return sock
