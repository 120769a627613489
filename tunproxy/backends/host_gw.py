"""The host-gw backend: no device, no encapsulation, just a route per peer.

Each peer's subnet is routed via its PublicIP on the underlay interface, so
every host must be on one L2 segment; a peer that is not on our underlay
subnet is refused (a route via it would need a gateway of its own). The MTU
is the underlay's.

flannel's host-gw puts no address anywhere (the subnet belongs to a bridge
and its containers). We put the subnet's first address on ``lo`` as a /32,
the address the udp and vxlan backends put on their devices, so that
``ping 10.100.X.0`` reaches a host the same way whatever backend it runs;
a host answers for an address on ``lo`` on any interface. The address carries
the label ``lo:tunproxy``: only addresses with it are ever removed from ``lo``.

``check`` restores a peer route someone deleted and drops overlay routes on
the underlay that no current peer accounts for (a killed run's leftovers).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from ipaddress import IPv4Address, IPv4Network

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..leftovers import LOOPBACK_LABEL, Kept
from ..logonce import REPEAT_EVERY, Said
from ..model import Lease
from ..netlink import ForeignRoute, delete_route, link_index, replace_route, routes_via, run_netlink
from .base import Backend, BackendContext, PeerRefused
from .rules import host_gw_refusal

log = logging.getLogger(__name__)

LOOPBACK = "lo"


class HostGwBackend(Backend):
    """flannel's host-gw: a route per peer subnet via the peer's PublicIP on the underlay; no device."""

    name = "host-gw"

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self.subnet: IPv4Network | None = None
        self.peers: dict[IPv4Network, Lease] = {}
        self._lock = asyncio.Lock()
        self._said = Said(repeat=REPEAT_EVERY)  # what check() cannot repair, said once a minute

    @property
    def mtu(self) -> int:
        """The underlay's MTU: nothing is encapsulated."""
        return self.ctx.underlay.mtu

    def _route(self, lease: Lease) -> dict[str, object]:
        return {"dst": str(lease.subnet), "gateway": str(lease.public_ip), "oif": self.ctx.underlay.index}

    def _loopback_addresses(self, ipr: IPRoute, index: int) -> list[IPv4Address]:
        """The /32s on lo with tunproxy's label: ours, or a killed run's (others' are left alone)."""
        found = []
        for a in ipr.get_addr(family=2, index=index):
            if a["prefixlen"] == 32 and a.get_attr("IFA_LABEL") == LOOPBACK_LABEL:
                found.append(IPv4Address(a.get_attr("IFA_ADDRESS")))
        return found

    def _set_loopback(self, ipr: IPRoute, want: IPv4Address | None) -> None:
        index = link_index(ipr, LOOPBACK)
        assert index is not None
        for addr in self._loopback_addresses(ipr, index):
            if addr != want:
                ipr.addr("del", index=index, address=str(addr), prefixlen=32)
        if want is not None:
            try:
                ipr.addr("add", index=index, address=str(want), prefixlen=32, label=LOOPBACK_LABEL)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise

    async def open(self) -> None:
        """Nothing to create: only says which underlay carries the routes."""
        log.info("host-gw: peers routed via their public IPs on %s", self.ctx.underlay.name)

    async def set_subnet(self, subnet: IPv4Network) -> None:
        """Puts the subnet's first address on ``lo`` as a /32, label ``lo:tunproxy``, the only one of ours."""
        self.subnet = subnet
        async with self._lock:
            await run_netlink(lambda ipr: self._set_loopback(ipr, subnet.network_address))

    async def add_peer(self, lease: Lease) -> None:
        """PeerRefused for a peer off our underlay subnet, for our own address, or for a route not ours."""
        reason = host_gw_refusal(lease.public_ip, self.ctx.underlay)
        if reason:
            raise PeerRefused(reason)

        def write(ipr: IPRoute) -> None:
            old = self.peers.get(lease.subnet)
            if old is not None and old.public_ip != lease.public_ip:
                delete_route(ipr, **self._route(old))
            replace_route(ipr, **self._route(lease))

        async with self._lock:
            try:
                await run_netlink(write)
            except ForeignRoute as e:  # retried at each check, in case its owner deletes it
                raise PeerRefused(str(e)) from None
            self.peers[lease.subnet] = lease

    async def remove_peer(self, lease: Lease) -> None:
        """The route via the peer goes; a peer never added is no error."""
        async with self._lock:
            old = self.peers.pop(lease.subnet, None)
            if old is not None:
                await run_netlink(lambda ipr: delete_route(ipr, **self._route(old)))

    async def check(self) -> None:
        """Restores missing peer routes and the ``lo`` address; deletes our routes no peer owns."""
        network = self.ctx.network.network
        oif = self.ctx.underlay.index

        def repair(ipr: IPRoute) -> tuple[list[Lease], list[IPv4Network]]:
            have = {(dst, gw) for dst, gw, _ in routes_via(ipr, oif=oif)}
            restored = []
            for lease in self.peers.values():
                if (lease.subnet, str(lease.public_ip)) not in have:
                    try:
                        replace_route(ipr, **self._route(lease))
                    except ForeignRoute as e:
                        if self._said.due(lease.subnet, str(e), time.monotonic()):
                            via = f"{lease.subnet} via {lease.public_ip}"
                            log.warning("route to %s not restored: %s", via, e)
                        continue
                    restored.append(lease)
            stale = []
            for dst, gw in have:
                if gw is not None and dst.subnet_of(network) and dst not in self.peers:
                    delete_route(ipr, dst=str(dst), gateway=gw, oif=oif)
                    stale.append(dst)
            if self.subnet is not None:
                self._set_loopback(ipr, self.subnet.network_address)
            return restored, stale

        async with self._lock:
            restored, stale = await run_netlink(repair)
        for lease in restored:
            log.warning("route to %s via %s was missing; restored", lease.subnet, lease.public_ip)
        for dst in stale:
            log.info("removed stale route to %s (no such peer)", dst)

    def kept(self) -> Kept:
        """The peers' routes on the underlay and our address on ``lo``."""
        name = self.ctx.underlay.name
        routes = frozenset((subnet, name) for subnet in self.peers)
        loopback = str(self.subnet.network_address) if self.subnet else None
        return Kept(routes=routes, loopback=loopback)

    async def close(self) -> None:
        """Every route this backend added goes (the lo address too)."""

        def teardown(ipr: IPRoute) -> None:
            for lease in self.peers.values():
                delete_route(ipr, **self._route(lease))
            self._set_loopback(ipr, None)

        async with self._lock:
            await run_netlink(teardown)
            self.peers.clear()


BACKEND = HostGwBackend
