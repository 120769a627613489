"""The daemon: one registry, one backend, and the lease table between them.

It is deliberately thin. It asks the registry for the config and our lease,
folds the registry's updates through a LeaseWatcher, and turns each event into
one backend call. Anything a backend or registry cannot do for one peer is
logged in one line and the rest keeps running; only setup errors stop us.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from .backends import Backend, BackendContext, create_backend
from .backends.base import PeerRefused
from .leases import EventKind, LeaseEvent, LeaseWatcher
from .netlink import find_underlay
from .observe import changed_fields
from .observer import ObserveOptions, Observer
from .peers.base import Changes, OwnLease, Registry, Snapshot
from .subnets import NetworkConfig

log = logging.getLogger("tunproxy")


@dataclass
class DaemonOptions:
    iface: str | None
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


def write_subnet_file(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers never see half a file


class Daemon:
    def __init__(self, registry: Registry, options: DaemonOptions) -> None:
        self.registry = registry
        self.options = options
        self.backend: Backend | None = None
        self.config: NetworkConfig | None = None
        self.watcher = LeaseWatcher()
        self.foreign: set[IPv4Network] = set()
        self.observer = Observer(self, options.observe)

    async def run(self) -> None:
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
            await self._own_lease(lease)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._stats_loop())
                tasks.create_task(self._check_loop())
                tasks.create_task(self._follow())
                tasks.create_task(self.observer.run())
        finally:
            await self.observer.stopping()
            if backend.stats():
                log.info("stats: %s", backend.stats())
            await backend.close()
            await self.registry.close()
            await self.observer.close()

    async def _own_lease(self, lease: Any) -> None:
        assert self.backend and self.config
        log.info("our subnet is %s", lease.subnet)
        await self._apply(self.watcher.set_own_subnet(lease.subnet))
        await self.backend.set_subnet(lease.subnet)
        if self.options.subnet_file:
            text = subnet_env(self.config.network, lease.subnet, self.backend.mtu, self.options.ipmasq)
            write_subnet_file(self.options.subnet_file, text)

    async def _follow(self) -> None:
        async for update in self.registry.updates():
            if isinstance(update, Snapshot):
                await self._apply(self.watcher.reset(update.leases))
                self.observer.synced()
            elif isinstance(update, Changes):
                await self._apply(self.watcher.update(update.events))
            elif isinstance(update, OwnLease):
                await self._own_lease(update.lease)

    async def _apply(self, events: list[LeaseEvent]) -> None:
        assert self.backend
        for event in events:
            lease = event.lease
            if lease.backend_type != self.backend.name:
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
                continue
            try:
                if event.kind is EventKind.ADDED:
                    await self.backend.add_peer(lease)
                    log.info("peer added: %s via %s", lease.subnet, lease.public_ip)
                else:
                    await self.backend.remove_peer(lease)
                    log.info("peer removed: %s via %s", lease.subnet, lease.public_ip)
            except PeerRefused as e:
                log.warning("peer %s (%s) refused: %s", lease.subnet, lease.public_ip, e)
            except OSError as e:
                log.error("peer %s (%s) %s failed: %s", lease.subnet, lease.public_ip, event.kind.value, e)

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
        assert self.backend
        while True:
            await asyncio.sleep(self.options.check_interval)
            try:
                await self.backend.check()
            except OSError as e:
                log.error("periodic check failed: %s", e)


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
