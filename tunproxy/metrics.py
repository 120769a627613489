"""HTTP for probes and Prometheus: ``/healthz``, ``/readyz`` and ``/metrics``, with aiohttp.

flannel's flags and defaults: ``--healthz-ip`` (0.0.0.0) and ``--healthz-port``
(no server unless given). ``/healthz`` is 200 while the daemon's loops run;
``/readyz`` is 200 once our lease is held and the backend has programmed every
peer, else 503 with a one-line reason (``tunproxy.observe.DaemonState.readiness``).
``/metrics`` is the Prometheus text format from prometheus-client; the
``Collector`` reads the fast path's counters when scraped (one C struct read),
so nothing is copied per packet. Metric names follow Prometheus's conventions
(``_total`` for counters, base units, ``_timestamp_seconds``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from ipaddress import IPv4Address
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import __version__
from .counters import COUNTERS as DESCRIBED
from .counters import DROP_PREFIX, PEER_COUNTERS, Counters
from .model import ConfigError
from .observe import READY, DaemonState

log = logging.getLogger("tunproxy")

STUCK_AFTER = 10.0  # seconds without a tick of the observer's loop: /healthz fails

# Fast-path counters exported as they are: name -> help (tunproxy.counters). The batch maxima
# are gauges; the drops and ICMP errors have families of their own, below.
COUNTERS = {
    name: c.help
    for name, c in DESCRIBED.items()
    if not c.gauge and not name.startswith((DROP_PREFIX, "icmp_"))
}
GAUGES = {name: c.help for name, c in DESCRIBED.items() if c.gauge}


class Observed(Protocol):
    """What the HTTP server reads (``tunproxy.observer.Observer`` is one): the daemon's state,
    brought up to date by ``refresh``; the fast path's counters (None without one); how long
    the daemon's loops have not run (``stuck_for``, given the event loop's time)."""

    state: DaemonState

    def refresh(self) -> None: ...

    def counters(self) -> Counters | None: ...

    def stuck_for(self, now: float) -> float | None: ...


class Collector:
    """A prometheus-client collector over an ``Observed``; see the module docstring."""

    def __init__(self, observer: Observed) -> None:
        self.observer = observer

    def collect(self) -> Iterator[Metric]:
        """The metrics now, per scrape: build info, readiness, peers, lease, store, fast path counters."""
        o = self.observer
        o.refresh()
        state = o.state
        info = GaugeMetricFamily(
            "tunproxy_build_info", "tunproxy's version and backend; always 1.", labels=["version", "backend"]
        )
        info.add_metric([__version__, state.backend or ""], 1)
        yield info
        phase, _ = state.readiness()
        yield GaugeMetricFamily("tunproxy_ready", "1 while /readyz says ready.", value=int(phase == READY))
        yield GaugeMetricFamily("tunproxy_peers", "Peers the backend was given.", value=len(state.peers))
        if state.lease is not None and state.lease_expiry is not None:
            yield GaugeMetricFamily(
                "tunproxy_lease_expiry_timestamp_seconds",
                "When our subnet lease expires unless renewed (Unix time).",
                value=state.lease_expiry,
            )
        store = state.store
        if store.get("kind") == "etcd":
            yield GaugeMetricFamily(
                "tunproxy_store_reachable", "1 while etcd answers.", value=int(bool(store.get("reachable")))
            )
            if store.get("watch_revision") is not None:
                yield GaugeMetricFamily(
                    "tunproxy_watch_revision",
                    "The etcd revision the lease watch has applied up to.",
                    value=store["watch_revision"],
                )
        c = o.counters()
        if c is None:
            return
        for name, help_ in COUNTERS.items():
            yield CounterMetricFamily(f"tunproxy_{name}", help_, value=getattr(c, name))
        for name, help_ in GAUGES.items():
            yield GaugeMetricFamily(f"tunproxy_{name}", help_, value=getattr(c, name))
        drops = CounterMetricFamily(
            "tunproxy_dropped_packets", "Packets dropped, by reason.", labels=["reason"]
        )
        for reason, value in c.drops.items():
            drops.add_metric([reason], value)
        yield drops
        yield CounterMetricFamily("tunproxy_icmp_errors_sent", DESCRIBED["icmp_sent"].help, value=c.icmp_sent)
        yield CounterMetricFamily(
            "tunproxy_icmp_errors_suppressed", DESCRIBED["icmp_ratelimited"].help, value=c.icmp_ratelimited
        )
        subnets = _subnets_by_ip(o)
        labels = ["subnet", "public_ip"]
        families = {
            name: CounterMetricFamily(f"tunproxy_peer_{name}", f"Per peer: {COUNTERS[name]}", labels=labels)
            for name in PEER_COUNTERS
        }
        for addr, pc in sorted(c.peers.items()):
            key = [subnets.get(addr, ""), str(addr)]
            for name, family in families.items():
                family.add_metric(key, getattr(pc, name))
        yield from families.values()


def _subnets_by_ip(o: Observed) -> dict[IPv4Address, str]:
    out: dict[IPv4Address, list[str]] = {}
    for subnet, peer in sorted(o.state.peers.items()):
        out.setdefault(peer.lease.public_ip, []).append(str(subnet))
    return {ip: ",".join(subnets) for ip, subnets in out.items()}


class HttpServer:
    """aiohttp on ``host:port`` serving the three paths; ``start`` raises ConfigError if it cannot bind."""

    def __init__(self, observer: Observed, host: str, port: int) -> None:
        self.observer = observer
        self.host, self.port = host, port
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Collector(observer))  # type: ignore[arg-type]
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)

    async def start(self) -> None:
        """Bind ``host:port`` and serve; ConfigError if it cannot bind."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            why = os.strerror(e.errno) if e.errno else str(e)
            raise ConfigError(f"cannot serve /healthz on {self.host}:{self.port}: {why}") from None
        log.info("serving /healthz, /readyz and /metrics on %s:%d", self.host, self.port)

    async def close(self) -> None:
        """Stop serving and release the port."""
        await self._runner.cleanup()

    async def healthz(self, request: web.Request) -> web.Response:
        """200 ``ok``; 503 while stopping or once the observer's loop has not run for ``STUCK_AFTER`` s."""
        stuck = self.observer.stuck_for(asyncio.get_running_loop().time())
        if self.observer.state.stopping:
            return web.Response(status=503, text="stopping\n")
        if stuck is not None and stuck > STUCK_AFTER:
            return web.Response(status=503, text=f"the daemon's loops have not run for {stuck:.0f}s\n")
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        """200 ``ready``, else 503 with the phase and why (``DaemonState.readiness``)."""
        self.observer.refresh()
        phase, reason = self.observer.state.readiness()
        if phase == READY:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"{phase}: {reason}\n")

    async def metrics(self, request: web.Request) -> web.Response:
        """The Prometheus text exposition of ``Collector``."""
        body: Any = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
