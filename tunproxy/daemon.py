"""The daemon: one registry, one backend, and the lease table between them.

It is deliberately thin. It asks the registry for the config and our lease,
folds the registry's updates through a LeaseWatcher, and hands each burst of
events to the backend as one ``apply`` call, in bounded chunks so the data
path keeps forwarding while thousands of leases come or go. Anything a backend
cannot do for one peer is logged once and retried on the next change and at
the periodic check; only setup errors stop us. Every background loop is
supervised: one that ends while the daemon runs takes the daemon down with
one line, rather than leaving it half alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from .backends import Backend, BackendContext, create_backend
from .backends.base import PeerRefused, RouteTableFull
from .leases import EventKind, LeaseEvent, LeaseWatcher
from .netlink import InterfaceChoice, find_underlay
from .observe import changed_fields
from .observer import ObserveOptions, Observer
from .peers.base import Changes, OwnLease, Registry, Snapshot
from .subnetenv import SubnetEnv
from .subnets import ConfigError, Lease, NetworkConfig
from .supervise import supervised

log = logging.getLogger("tunproxy")


@dataclass
class DaemonOptions:
    iface: InterfaceChoice | str | None
    public_ip: IPv4Address | None
    subnet_file: Path | None
    stats_interval: float = 60.0
    check_interval: float = 10.0
    ipmasq: bool = False
    backend_options: dict[str, Any] = field(default_factory=dict)
    observe: ObserveOptions = field(default_factory=ObserveOptions)


def subnet_env(network: IPv4Network, subnet: IPv4Network, mtu: int, ipmasq: bool) -> str:
    """flannel's subnet.env: FLANNEL_SUBNET is the subnet's first host address with its length."""
    first = subnet.network_address + 1
    return (
        f"FLANNEL_NETWORK={network}\n"
        f"FLANNEL_SUBNET={first}/{subnet.prefixlen}\n"
        f"FLANNEL_MTU={mtu}\n"
        f"FLANNEL_IPMASQ={'true' if ipmasq else 'false'}\n"
    )


CHUNK = 512  # lease events applied between two turns of the event loop
LOG_EACH = 16  # bursts larger than this are logged as one summary line (each peer at debug)


def write_subnet_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: readers never see half a file.

    The temporary file has a unique name (mkstemp in the same directory), so
    two daemons sharing a filesystem never write through the same one.
    Raises OSError naming the path (NotADirectoryError when the directory is a file).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # mkdir's answer when the directory's name is taken by a file
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path.parent)) from None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# struct flock from <fcntl.h> on Linux: l_type, l_whence, l_start, l_len, l_pid (and padding).
_FLOCK = struct.Struct("@hhqqi4x")


class SubnetFileLock:
    """An exclusive lock on ``<subnet file>.lock``, held while the daemon runs.

    A second daemon given the same subnet file (for instance the default
    one, by two hosts of a lab in network namespaces on one machine) would
    overwrite the first one's subnet.env; it is refused instead. The lock is
    a POSIX record lock, so the kernel names the holder's PID (F_GETLK) and
    drops the lock when the holder dies, however it dies.
    """

    def __init__(self, subnet_file: Path) -> None:
        self.subnet_file = subnet_file
        self.path = subnet_file.with_name(subnet_file.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock; ConfigError naming the file and the holder's PID if another daemon has it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the directory {self.path.parent}: {e.strerror}") from None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ConfigError(f"cannot open the lock file {self.path}: {e.strerror}") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self._holder(fd)
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise ConfigError(f"cannot lock {self.path}: {e.strerror}") from None
            who = f"pid {holder}" if holder else "another process"
            raise ConfigError(
                f"subnet file {self.subnet_file} is in use by another tunproxy ({who}); "
                "give each daemon its own --subnet-file"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    @staticmethod
    def _holder(fd: int) -> int | None:
        with contextlib.suppress(OSError):
            query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
            l_type, _, _, _, pid = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_GETLK, query))
            if l_type != fcntl.F_UNLCK and pid > 0:
                return int(pid)
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock; the file stays for the next daemon
            self._fd = None


class Daemon:
    def __init__(self, registry: Registry, options: DaemonOptions) -> None:
        self.registry = registry
        self.options = options
        self.backend: Backend | None = None
        self.config: NetworkConfig | None = None
        self.watcher = LeaseWatcher()
        self.foreign: set[IPv4Network] = set()
        # Leases the backend could not apply, retried on the next change and at each check.
        self.unapplied: dict[IPv4Network, Lease] = {}
        self._refusals_said: dict[IPv4Network, str] = {}
        self._lock = SubnetFileLock(options.subnet_file) if options.subnet_file else None
        self._env = SubnetEnv(options.subnet_file, write_subnet_file) if options.subnet_file else None
        self.observer = Observer(self, options.observe)

    async def run(self) -> None:
        if self._lock is not None:
            self._lock.acquire()
        try:
            await self._run()
        finally:
            if self._lock is not None:
                self._lock.release()

    async def _run(self) -> None:
        opts = self.options
        underlay = await asyncio.to_thread(find_underlay, opts.iface, opts.public_ip)
        public_ip = opts.public_ip or underlay.address
        self.watcher.own_public_ip = public_ip
        self.config = config = await self.registry.network_config()
        ctx = BackendContext(config, underlay, public_ip, opts.backend_options)
        self.backend = backend = create_backend(ctx)
        log.info(
            "backend %s on %s (%s), public ip %s, mtu %d",
            backend.name,
            underlay.name,
            underlay.address,
            public_ip,
            backend.mtu,
        )
        try:
            await self.observer.start()
            await backend.open()
            lease = await self.registry.acquire(public_ip, backend.name, backend.backend_data)
            await self._own_lease(lease, at_start=True)
            async with asyncio.TaskGroup() as tasks:
                loops = {"the lease watch": self._follow(), "the periodic check": self._check_loop()}
                loops["the observer"] = self.observer.run()
                if opts.stats_interval > 0:
                    loops["the stats logger"] = self._stats_loop()
                for name, loop in loops.items():
                    tasks.create_task(supervised(name, loop), name=name)
        finally:
            await self.observer.stopping()
            if backend.stats():
                log.info("stats: %s", backend.stats())
            await backend.close()
            await self.registry.close()
            await self.observer.close()

    async def _own_lease(self, lease: Any, at_start: bool = False) -> None:
        assert self.backend and self.config
        log.info("our subnet is %s", lease.subnet)
        await self._apply(self.watcher.set_own_subnet(lease.subnet))
        await self.backend.set_subnet(lease.subnet)
        if self._env:  # a failure at run time is logged and retried at each check, see SubnetEnv
            text = subnet_env(self.config.network, lease.subnet, self.backend.mtu, self.options.ipmasq)
            self._env.set(text, fatal=at_start)

    async def _follow(self) -> None:
        reconciled = False
        async for update in self.registry.updates():
            if isinstance(update, Snapshot):
                await self._apply(self.watcher.reset(update.leases))
                if not reconciled:
                    reconciled = True
                    await self._reconcile()
                self.observer.synced()
            elif isinstance(update, Changes):
                await self._apply(self.watcher.update(update.events))
            elif isinstance(update, OwnLease):
                await self._own_lease(update.lease)

    async def _reconcile(self) -> None:
        """A killed run's leftovers go now, not at the first periodic check."""
        assert self.backend
        try:
            await self.backend.reconcile()
        except OSError as e:
            log.error("removing leftovers of an earlier run failed: %s", e)
        log.info("ready: %d peer(s)", self._routed())

    async def _apply(self, events: Sequence[LeaseEvent]) -> None:
        """Hand a burst of events to the backend in chunks of CHUNK, yielding to the loop between.

        Leases refused earlier are offered again with each burst: a table
        that was full may have room now.
        """
        removed: list[Lease] = []
        added: list[Lease] = []
        for start in range(0, len(events), CHUNK):
            if start:
                await asyncio.sleep(0)  # let the data path run between chunks
            gone, new = await self._apply_chunk(events[start : start + CHUNK], retry=False)
            removed += gone
            added += new
        if self.unapplied:  # once per burst, after its removals: room may have freed
            _, new = await self._apply_chunk((), retry=True)
            added += new
        self._log_changes(removed, added)

    async def _apply_chunk(
        self, events: Sequence[LeaseEvent], retry: bool
    ) -> tuple[list[Lease], list[Lease]]:
        """Apply up to CHUNK events, or with ``retry`` the leases waiting; returns what was removed, added."""
        assert self.backend
        removed: dict[IPv4Network, Lease] = {}
        added: dict[IPv4Network, Lease] = {}
        for event in events:
            lease = event.lease
            if lease.backend_type != self.backend.name:
                self._foreign(event)
                continue
            if event.kind is EventKind.ADDED:
                added[lease.subnet] = lease
            else:
                added.pop(lease.subnet, None)
                if self.unapplied.pop(lease.subnet, None) is None:
                    removed[lease.subnet] = lease
                self._refusals_said.pop(lease.subnet, None)
        for subnet in added:
            self.unapplied.pop(subnet, None)
        waiting = dict(self.unapplied) if retry else {}
        if retry:
            self.unapplied.clear()
        if not (removed or added or waiting):
            return [], []
        failures = await self.backend.apply(list(removed.values()), [*waiting.values(), *added.values()])
        failed = {lease.subnet for lease, _ in failures}
        self._say_refusals(failures)
        return list(removed.values()), [
            lease for lease in (*waiting.values(), *added.values()) if lease.subnet not in failed
        ]

    def _foreign(self, event: LeaseEvent) -> None:
        assert self.backend
        lease = event.lease
        if event.kind is EventKind.ADDED and lease.subnet not in self.foreign:
            self.foreign.add(lease.subnet)
            log.warning(
                "ignoring peer %s (%s): it runs backend %s, we run %s",
                lease.subnet,
                lease.public_ip,
                lease.backend_type,
                self.backend.name,
            )
        elif event.kind is EventKind.REMOVED:
            self.foreign.discard(lease.subnet)

    def _say_refusals(self, failures: list[tuple[Lease, Exception]]) -> None:
        """Keep failed leases for a retry; log each reason once per lease (a full table as one line)."""
        full: list[Lease] = []
        for lease, error in failures:
            self.unapplied[lease.subnet] = lease
            reason = str(error)
            if self._refusals_said.get(lease.subnet) == reason:
                continue
            self._refusals_said[lease.subnet] = reason
            if isinstance(error, RouteTableFull):
                full.append(lease)
            elif isinstance(error, PeerRefused):
                log.warning("peer %s (%s) refused: %s", lease.subnet, lease.public_ip, error)
            else:
                log.error("peer %s (%s) not added: %s; will retry", lease.subnet, lease.public_ip, error)
        if full:
            log.error(
                "%s: not routing %d peer(s) (%s); they are added when room frees "
                "(raise --max-routes to hold more)",
                str(failures[0][1]) if len(failures) == len(full) else "route table full",
                len(full),
                _some(full),
            )

    def _log_changes(self, removed: Sequence[Lease], added: Sequence[Lease]) -> None:
        """One line per peer for small bursts; one summary line for big ones (each peer at debug)."""
        small = len(removed) + len(added) <= LOG_EACH
        for what, leases in (("removed", removed), ("added", added)):
            for lease in leases:
                log.log(
                    logging.INFO if small else logging.DEBUG,
                    "peer %s: %s via %s",
                    what,
                    lease.subnet,
                    lease.public_ip,
                )
        if not small:
            log.info(
                "peers: %d added, %d removed in one burst (%d routed now)",
                len(added),
                len(removed),
                self._routed(),
            )

    def _routed(self) -> int:
        """Peers routed now: the leases of our backend less those waiting for a retry; O(peers)."""
        assert self.backend
        ours = sum(1 for lease in self.watcher.leases.values() if lease.backend_type == self.backend.name)
        return ours - len(self.unapplied)

    async def _stats_loop(self) -> None:
        assert self.backend
        if self.options.stats_interval <= 0:
            return
        previous: str | None = None
        while True:
            await asyncio.sleep(self.options.stats_interval)
            line = self.backend.stats()
            if line:  # only what changed, but a line every interval: a heartbeat
                log.info("stats: %s", changed_fields(previous, line) or "unchanged")
            previous = line or previous

    async def _check_loop(self) -> None:
        """Restore what was removed behind our back and retry refused leases; never ends on an error."""
        assert self.backend
        while True:
            await asyncio.sleep(self.options.check_interval)
            try:
                if self._env:
                    self._env.flush()
                await self.backend.check()
                if self.unapplied:
                    await self._apply(())
            except Exception as e:  # one bad round must not end the loop
                log.debug("periodic check failed", exc_info=True)
                log.error("periodic check failed: %s", e)


def _some(leases: Sequence[Lease], shown: int = 3) -> str:
    """A few subnets of a long list for a log line: 'a, b, c and 97 more'."""
    names = ", ".join(str(lease.subnet) for lease in leases[:shown])
    return names if len(leases) <= shown else f"{names} and {len(leases) - shown} more"


async def serve(daemon: Daemon) -> None:
    """Run until SIGINT/SIGTERM; SIGHUP asks the registry to reload."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def stop(signame: str) -> None:
        log.info("%s: shutting down", signame)
        task.cancel()

    loop.add_signal_handler(signal.SIGINT, stop, "SIGINT")
    loop.add_signal_handler(signal.SIGTERM, stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGHUP, daemon.registry.reload)
    with contextlib.suppress(asyncio.CancelledError):
        await daemon.run()
