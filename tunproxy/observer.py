"""The daemon's window: control socket, HTTP health and metrics, systemd notifications, ip-masq.

The daemon owns one ``Observer``; the observer pulls what it shows from the
daemon (backend, watcher, registry) when asked and once a second, and the
daemon only says when its first list of peers is applied (``synced``).
Everything that answers the outside world hangs off it, so the daemon's own
loop stays as it was. ``start`` binds the
sockets (a port in use is a ConfigError, one line, before anything else
happens), ``run`` is the background task (samples counters once a second,
sends systemd notifications, keeps the ip-masq rules in place), ``close``
undoes all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .counters import Counters
from .logonce import REPEAT_EVERY, Said
from .observe import READY, DaemonState, PeerSample, PeerState, Sample, Sampler, status_document

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("tunproxy")

SAMPLE_INTERVAL = 1.0


@dataclass(frozen=True)
class ObserveOptions:
    """What to open: the control socket (None: none), HTTP on ``healthz_ip:healthz_port``
    (port None: off, as flannel), nftables masquerading, and systemd's notify socket."""

    control_socket: Path | None = None
    healthz_ip: str = "0.0.0.0"
    healthz_port: int | None = None
    ipmasq: bool = False
    notify_socket: str | None = None
    watchdog_usec: int | None = None


def sample_of(counters: Counters, at: float) -> Sample:
    """A fast path ``Counters`` snapshot as a ``Sample`` taken at monotonic ``at``."""
    totals = counters.totals
    peers = {
        addr: PeerSample(p.tx_packets, p.tx_bytes, p.rx_packets, p.rx_bytes)
        for addr, p in counters.peers.items()
    }
    return Sample(at, totals, dict(counters.drops), peers)


class Observer:
    """See the module docstring. ``daemon`` is read (backend, registry, config), never driven."""

    def __init__(self, daemon: Daemon, options: ObserveOptions) -> None:
        self.daemon = daemon
        self.options = options
        self.state = DaemonState()
        self.sampler = Sampler()
        self.started_at = time.time()
        self._closers: list[Any] = []
        self._notifier: Any = None
        self._masq: Any = None
        self._phase: tuple[str, str] | None = None
        self._tick: float | None = None  # loop time of run()'s last round
        self._said = Said(repeat=REPEAT_EVERY)

    # ---- what the daemon reports ----

    def synced(self) -> None:
        """A full list of peers has been handed to the backend (the one hook the daemon calls)."""
        self.state.synced = True
        self.refresh()

    # ---- what the outside asks ----

    def refresh(self) -> None:
        """Pull the daemon's state: backend, our lease (with its expiry from the registry), the
        peers the backend was given (and any it has not applied: the daemon's ``waiting``, if it
        keeps one), the store and any lease problem. Pulled, not pushed, so the daemon only
        has to say when its first list of peers is applied (``synced``)."""
        d, s = self.daemon, self.state
        b = d.backend
        if b is not None:
            s.backend, s.mtu = b.name, b.mtu
            s.underlay, s.public_ip, s.network = b.ctx.underlay.name, b.ctx.public_ip, b.ctx.network.network
        registry = d.registry
        s.store = registry.describe()
        s.lease_problem = registry.lease_problem
        s.lease = d.own_lease
        s.lease_expiry = registry.lease_expiry() if s.lease is not None else None
        waiting = d.waiting
        s.peers = {
            subnet: PeerState(lease, (waiting.reason(subnet) or "not applied") if subnet in waiting else None)
            for subnet, lease in d.watcher.leases.items()
        }
        self._changed()

    def counters(self) -> Counters | None:
        """The fast path's counters now (None without a backend, or for one without a fast path)."""
        backend = self.daemon.backend
        return backend.counters() if backend is not None else None

    def snapshot(self) -> Sample | None:
        """The fast path's counters now as a ``Sample`` (None for a backend without one)."""
        counters = self.counters()
        return None if counters is None else sample_of(counters, time.monotonic())

    def sample(self) -> None:
        """Feed the fast path's counters now to the sampler (nothing for a backend without a fast path)."""
        if (snap := self.snapshot()) is not None:
            self.sampler.add(snap)

    def status(self) -> dict[str, Any]:
        """The ``status`` document, with version, pid and ``started`` (Unix time)."""
        self.refresh()
        doc = status_document(self.state, self.sampler, time.monotonic(), time.time(), self.snapshot())
        doc |= {"version": __version__, "pid": os.getpid(), "started": self.started_at}
        return doc

    def drops(self) -> dict[str, Any]:
        """The ``drops`` document: the fast path's ring of recently dropped packets."""
        from .drops import drop_document

        backend = self.daemon.backend
        return drop_document(backend.drop_ring() if backend else None, time.monotonic(), time.time())

    def handle(self, request: dict[str, Any]) -> Any:
        """Answer a control request ``{"command": "status" | "drops"}``; ``{"error": ...}`` otherwise."""
        command = request.get("command")
        if command == "status":
            return self.status()
        if command == "drops":
            return self.drops()
        return {"error": f"unknown command {command!r}"}

    # ---- lifecycle ----

    async def start(self) -> None:
        """Bind the control socket and the HTTP port, check nft; ConfigError (one line) if one fails."""
        o = self.options
        try:
            if o.control_socket is not None:
                from .control import ControlServer

                server = ControlServer(o.control_socket, self.handle)
                await server.start()
                self._closers.append(server.close)
            if o.healthz_port is not None:
                from .metrics import HttpServer

                http = HttpServer(self, o.healthz_ip, o.healthz_port)
                await http.start()
                self._closers.append(http.close)
            if o.notify_socket:
                from .sdnotify import Notifier

                self._notifier = Notifier(o.notify_socket)
                self._closers.append(self._notifier.close)
            if o.ipmasq:
                from .ipmasq import IpMasq

                assert self.daemon.config is not None
                self._masq = IpMasq(self.daemon.config.network)
                await self._masq.check_available()
                self._closers.append(self._masq.remove)
        except BaseException:
            await self.close()
            raise
        self.refresh()

    async def run(self) -> None:
        """Sample counters every second, ping systemd's watchdog, keep the ip-masq rules. Runs
        until cancelled; the daemon starts it with its other loops, once our lease is held."""
        loop = asyncio.get_running_loop()
        watchdog = (self.options.watchdog_usec or 0) / 1e6 / 2  # systemd: ping at half the timeout
        check = max(1.0, self.daemon.options.check_interval)
        next_ping = next_check = loop.time()
        while True:
            self._tick = loop.time()
            self.sample()
            self.refresh()
            now = loop.time()
            if self._notifier is not None and watchdog > 0 and now >= next_ping:
                self._notifier.send("WATCHDOG=1")
                next_ping = now + watchdog
            lease = self.state.lease
            if self._masq is not None and lease is not None:
                # At once for a new subnet; every check interval, whether someone deleted the table.
                if lease.subnet != self._masq.subnet or now >= next_check:
                    next_check = now + check
                    try:
                        await self._masq.check(lease.subnet)
                    except OSError as e:
                        if self._said.due("ip-masq", str(e), now):
                            log.error("ip-masq: %s", e)
                    else:
                        self._said.forget("ip-masq")
            await asyncio.sleep(min(SAMPLE_INTERVAL, watchdog) if watchdog > 0 else SAMPLE_INTERVAL)

    def stuck_for(self, now: float) -> float | None:
        """Seconds since the background loop last ran (None before it started): the event
        loop is blocked, or the daemon's task group has died, when this grows."""
        return None if self._tick is None else now - self._tick

    async def stopping(self) -> None:
        """Mark us stopping (/healthz answers 503) and tell systemd ``STOPPING=1``."""
        self.state.stopping = True
        if self._notifier is not None:
            self._notifier.send("STOPPING=1\nSTATUS=shutting down")

    async def close(self) -> None:
        """Close what ``start`` opened, in reverse order, ignoring errors: we are stopping."""
        closers, self._closers = self._closers[::-1], []
        for close in closers:
            with contextlib.suppress(Exception):
                result = close()
                if asyncio.iscoroutine(result):
                    await result

    def _changed(self) -> None:
        """Tell systemd about a new phase: READY=1 the first time we are ready, STATUS= always."""
        phase = self.state.readiness()
        if phase == self._phase:
            return
        first_ready = phase[0] == READY and (self._phase is None or self._phase[0] != READY)
        self._phase = phase
        if self._notifier is None or self.state.stopping:
            return
        status = self._status_line()
        self._notifier.send(("READY=1\n" if first_ready else "") + f"STATUS={status}")

    def _status_line(self) -> str:
        phase, reason = self._phase or self.state.readiness()
        s = self.state
        if phase == READY:
            subnet = s.lease.subnet if s.lease else "?"
            n = len(s.peers)
            return f"ready: subnet {subnet}, {n} peer{'' if n == 1 else 's'}, backend {s.backend}"
        return f"{phase}: {reason}"
