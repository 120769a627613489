"""The daemon: one registry, one backend, and the lease fold between them.

It is deliberately thin. It asks the registry for the config and our lease,
folds the registry's updates through a LeaseWatcher (which decides what is
routed), and turns each ``PeerChanges`` into ``apply`` calls on the backend,
in bounded chunks so the data path keeps forwarding while thousands of leases
come or go. Anything a backend cannot do for one peer is logged once and
retried on the next change and at the periodic check; only setup errors stop
us. Every background loop is supervised: one that ends while the daemon runs
takes the daemon down with one line, rather than leaving it half alive.

The underlay lookup and the backend factory are parameters, so a fake
registry and a fake backend drive a real Daemon in unit tests, without root.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

from .backend_config import UdpFlags
from .backends import Backend, BackendContext, create_backend
from .backends.base import PeerRefused, RouteTableFull
from .logonce import REPEAT_EVERY, Said
from .model import CHECK_INTERVAL, STATS_INTERVAL, Lease, NetworkConfig
from .netlink import InterfaceChoice, Underlay, find_underlay
from .observe import changed_fields
from .observer import ObserveOptions, Observer
from .peers.base import Changes, OwnLease, Registry, Snapshot
from .subnetenv import SubnetEnv, SubnetFileLock, subnet_env, write_subnet_file
from .supervise import supervised
from .watcher import LeaseWatcher, PeerChanges, Waiting

log = logging.getLogger("tunproxy")


@dataclass
class DaemonOptions:
    """What ``tunproxy run`` gives the daemon besides the registry.

    ``iface``: how to pick the underlay (a str is one ``--iface``; None: as
    ``find_underlay`` does with nothing given). ``public_ip``: the address
    peers send to (None: the underlay's). ``subnet_file``: where subnet.env
    goes, locked against a second daemon (None: not written).
    ``stats_interval``: seconds between counter summaries in the log (0: only
    at exit). ``check_interval``: seconds between the checks that restore
    state removed behind our back (> 0). ``ipmasq``: subnet.env's
    ``FLANNEL_IPMASQ`` (the rules are ``observe.ipmasq``'s). ``udp``: the udp
    backend's flags. ``observe``: control socket, HTTP, systemd notify, ip-masq.
    """

    iface: InterfaceChoice | str | None
    public_ip: IPv4Address | None
    subnet_file: Path | None
    stats_interval: float = STATS_INTERVAL
    check_interval: float = CHECK_INTERVAL
    ipmasq: bool = False
    udp: UdpFlags = field(default_factory=UdpFlags)
    observe: ObserveOptions = field(default_factory=ObserveOptions)


CHUNK = 512  # lease events applied between two turns of the event loop
LOG_EACH = 16  # bursts larger than this are logged as one summary line (each peer at debug)


UnderlayLookup = Callable[[InterfaceChoice | str | None, IPv4Address | None], Underlay]
BackendFactory = Callable[[BackendContext], Backend]


class Daemon:
    """Runs one registry and one backend until cancelled (see the module docstring).

    ``find_underlay`` (blocking: called in a worker thread) and
    ``create_backend`` default to the real ones; tests pass fakes.
    """

    def __init__(
        self,
        registry: Registry,
        options: DaemonOptions,
        find_underlay: UnderlayLookup = find_underlay,
        create_backend: BackendFactory = create_backend,
    ) -> None:
        self.registry = registry
        self.options = options
        self._find_underlay = find_underlay
        self._create_backend = create_backend
        self.backend: Backend | None = None
        self.config: NetworkConfig | None = None
        self.own_lease: Lease | None = None
        self.watcher = LeaseWatcher("")
        # Leases the backend could not apply, retried on the next change and at each check,
        # and the reason last logged for each (logged again only when it changes).
        self.waiting = Waiting()
        self._check_said = Said(repeat=REPEAT_EVERY)
        self._lock = SubnetFileLock(options.subnet_file) if options.subnet_file else None
        self._env = SubnetEnv(options.subnet_file, write_subnet_file) if options.subnet_file else None
        self.observer = Observer(self, options.observe)

    async def run(self) -> None:
        """Run until cancelled, holding the subnet file's lock (ConfigError if another daemon has it)."""
        if self._lock is not None:
            self._lock.acquire()
        try:
            await self._run()
        finally:
            if self._lock is not None:
                self._lock.release()

    async def _run(self) -> None:
        opts = self.options
        underlay = await asyncio.to_thread(self._find_underlay, opts.iface, opts.public_ip)
        public_ip = opts.public_ip or underlay.address
        self.config = config = await self.registry.network_config()
        ctx = BackendContext(config, underlay, public_ip, opts.udp)
        self.backend = backend = self._create_backend(ctx)
        self.watcher = LeaseWatcher(backend.name, own_public_ip=public_ip)
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
            if line := backend.stats():
                log.info("stats: %s", line)
            await backend.close()
            await self.registry.close()
            await self.observer.close()

    async def _own_lease(self, lease: Lease, at_start: bool = False) -> None:
        assert self.backend and self.config
        log.info("our subnet is %s", lease.subnet)
        self.own_lease = lease
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

    async def _apply(self, changes: PeerChanges) -> None:
        """Hand a fold's changes to the backend in chunks of CHUNK, yielding to the loop between.

        Removals go first, so a full table has room for the additions.
        Leases refused before this burst are offered again first, once: a
        table that was full may have room now.
        """
        assert self.backend
        for lease in changes.foreign:
            log.warning(
                "ignoring peer %s (%s): it runs backend %s, we run %s",
                lease.subnet,
                lease.public_ip,
                lease.backend_type,
                self.backend.name,
            )
        removed = self.waiting.settle(changes)
        # Leases refused before this burst go first (they waited longest), each tried once per burst.
        added = self.waiting.take() + list(changes.added)
        done: list[Lease] = []
        for start in range(0, len(removed), CHUNK):
            if start:
                await asyncio.sleep(0)  # let the data path run between chunks
            await self.backend.apply(removed[start : start + CHUNK], ())
        for start in range(0, len(added), CHUNK):
            if start or removed:
                await asyncio.sleep(0)
            done += await self._add(added[start : start + CHUNK])
        self._log_changes(removed, done)

    async def _add(self, leases: Sequence[Lease]) -> list[Lease]:
        """Add ``leases``; those refused are kept for a retry. Returns those added."""
        assert self.backend
        if not leases:
            return []
        failures = await self.backend.apply((), leases)
        self._say_refusals(failures)
        failed = {lease.subnet for lease, _ in failures}
        return [lease for lease in leases if lease.subnet not in failed]

    def _say_refusals(self, failures: list[tuple[Lease, Exception]]) -> None:
        """Keep failed leases for a retry; log each reason once per lease (a full table as one line)."""
        full: list[Lease] = []
        for lease, error in failures:
            if not self.waiting.refused(lease, str(error)):
                continue
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
        """Peers routed now: the leases of our backend less those waiting for a retry."""
        return len(self.watcher.leases) - len(self.waiting)

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
                if self.waiting:
                    await self._apply(PeerChanges())
            except Exception as e:  # one bad round must not end the loop
                log.debug("periodic check failed", exc_info=True)
                if self._check_said.due("check", str(e), time.monotonic()):
                    log.error("periodic check failed: %s", e)
            else:
                self._check_said.forget("check")


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
