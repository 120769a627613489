"""The vxlan backend: the kernel's VXLAN device, programmed the way flannel programs it.

How it works. One device, ``tunproxy.<VNI>``, with learning off: nothing is
flooded or learned, every remote is written in. Our own subnet's first
address goes on the device as a /32 (flannel's choice), and for each peer
three entries are added, in this order, and removed in the reverse one:

* a permanent neighbour entry: the peer subnet's .0 address -> the peer's VtepMAC,
* a permanent FDB entry: VtepMAC -> the peer's PublicIP (where to send the UDP),
* a route: the peer subnet via its .0 address, onlink, on the device.

So the kernel resolves the next hop without ARP and the outer destination
without flooding. The VtepMAC is derived from the public IP (see
``vtep_mac``): it is stable across restarts and a static peer's can be
computed. With ``DirectRouting`` a peer whose PublicIP is on our underlay
subnet gets a plain route via that PublicIP instead, with no encapsulation.

``open`` reuses a compatible leftover device (same VNI, port, local address,
underlay, GBP, learning off) and replaces an incompatible one, like flannel's
``ensureLink``. ``check`` (every few seconds, from the daemon, and once right
after the first snapshot of leases) recreates the device if someone deleted or
changed it, re-writes every peer's entries, and drops routes, FDB entries and
permanent neighbour entries of ours that no current peer accounts for (a
killed run's).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..backend_config import VXLAN_DEFAULT_VNI, VxlanOptions
from ..leftovers import Kept
from ..logonce import REPEAT_EVERY, Said
from ..model import ConfigError, Lease, NetworkConfig
from ..netlink import (
    ForeignRoute,
    delete_route,
    ensure_address,
    link_index,
    replace_route,
    routes_via,
    run_netlink,
)
from .base import Backend, BackendContext, PeerRefused
from .rules import (
    VxlanSettings,
    device_name,
    link_mismatch,
    peer_vtep_mac,
    routes_directly,
    vtep_mac,
)

log = logging.getLogger(__name__)

NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
RTNH_F_ONLINK = 0x04


@dataclass(frozen=True)
class _Peer:
    lease: Lease
    mac: str | None  # None: routed directly on the underlay

    @property
    def gateway(self) -> IPv4Address:
        return self.lease.subnet.network_address


class VxlanBackend(Backend):
    """flannel's vxlan: a kernel VXLAN device, with a neighbour, FDB entry and route per peer."""

    name = "vxlan"

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        options = ctx.network.backend
        assert isinstance(options, VxlanOptions)
        self.options = VxlanSettings.settle(options, ctx.underlay.mtu)
        if self.options.clamped_from is not None:
            log.warning(
                "Backend.MTU %d is above the MTU %d of %s; encapsulated packets use %d (device MTU %d)",
                self.options.clamped_from,
                ctx.underlay.mtu,
                ctx.underlay.name,
                ctx.underlay.mtu,
                self.options.mtu,
            )
        self.device = device_name(self.options.vni)
        self.mac = vtep_mac(ctx.public_ip)
        self.subnet: IPv4Network | None = None
        self.peers: dict[IPv4Network, _Peer] = {}
        self._lock = asyncio.Lock()  # check() and the lease events both write netlink state
        self._said = Said(repeat=REPEAT_EVERY)  # what check() cannot repair, said once a minute

    @property
    def mtu(self) -> int:
        """The device MTU: ``Backend.MTU`` (else the underlay's, and never above it) less VXLAN's 50 bytes."""
        return self.options.mtu

    @property
    def backend_data(self) -> Any:
        """flannel's vxlan BackendData: ``{"VNI": int, "VtepMAC": "xx:xx:xx:xx:xx:xx"}``."""
        return {"VNI": self.options.vni, "VtepMAC": self.mac}

    @classmethod
    def static_backend_data(cls, public_ip: IPv4Address, config: NetworkConfig) -> Any:
        """A static peer's BackendData: its VtepMAC follows from its address, the VNI from the config."""
        options = config.backend
        vni = options.vni if isinstance(options, VxlanOptions) else VXLAN_DEFAULT_VNI
        return {"VNI": vni, "VtepMAC": vtep_mac(public_ip)}

    # -- blocking netlink work, run in a worker thread ------------------------------------------

    def _wanted_link(self) -> dict[str, Any]:
        u = self.ctx.underlay
        return {
            "vni": self.options.vni,
            "port": self.options.port,
            "local": str(u.address),
            "link": u.index,
            "gbp": self.options.gbp,
            "learning": False,
        }

    @staticmethod
    def _link_info(link: Any) -> dict[str, Any]:
        linkinfo = link.get_attr("IFLA_LINKINFO")
        kind = linkinfo.get_attr("IFLA_INFO_KIND") if linkinfo else None
        data = linkinfo.get_attr("IFLA_INFO_DATA") if kind == "vxlan" else None
        if data is None:
            return {"kind": kind}
        return {
            "kind": kind,
            "vni": data.get_attr("IFLA_VXLAN_ID"),
            "port": data.get_attr("IFLA_VXLAN_PORT"),
            "local": data.get_attr("IFLA_VXLAN_LOCAL"),
            "link": data.get_attr("IFLA_VXLAN_LINK"),
            "gbp": bool(data.get_attr("IFLA_VXLAN_GBP")),
            "learning": bool(data.get_attr("IFLA_VXLAN_LEARNING")),
        }

    def _ensure_link(self, ipr: IPRoute) -> tuple[int, bool]:
        """Create, reuse or replace the device; return (index, whether it was (re)created)."""
        want = {"kind": "vxlan", **self._wanted_link()}
        index = link_index(ipr, self.device)
        created = False
        if index is not None:
            mismatch = link_mismatch(self._link_info(ipr.get_links(index)[0]), want)
            if mismatch:
                log.warning("replacing %s, it does not match: %s", self.device, "; ".join(mismatch))
                ipr.link("del", index=index)
                index = None
        if index is None:
            args: dict[str, Any] = {
                "ifname": self.device,
                "kind": "vxlan",
                "vxlan_id": self.options.vni,
                "vxlan_local": want["local"],
                "vxlan_link": want["link"],
                "vxlan_port": self.options.port,
                "vxlan_learning": 0,
                "address": self.mac,
                "mtu": self.options.mtu,
            }
            if self.options.gbp:
                args["vxlan_gbp"] = True
            try:
                ipr.link("add", **args)
            except NetlinkError as e:
                if e.code == errno.EEXIST:  # the kernel allows one device per (VNI, port, local)
                    raise ConfigError(
                        f"cannot create {self.device}: another VXLAN device already uses "
                        f"VNI {self.options.vni} on port {self.options.port}"
                    ) from None
                raise
            index = link_index(ipr, self.device)
            assert index is not None
            created = True
        link = ipr.get_links(index)[0]
        changes: dict[str, Any] = {"state": "up"}
        # Setting the MAC, even to the same value, makes the kernel flush every neighbour entry on
        # the device (NETDEV_CHANGEADDR), the permanent ones too: so only when it differs.
        if link.get_attr("IFLA_ADDRESS") != self.mac:
            changes["address"] = self.mac
        if link.get_attr("IFLA_MTU") != self.options.mtu:
            changes["mtu"] = self.options.mtu
        ipr.link("set", index=index, **changes)
        return index, created

    def _configure_subnet(self, ipr: IPRoute, index: int) -> None:
        if self.subnet is not None:
            ensure_address(ipr, index, self.subnet.network_address, 32)

    def _write_peer(self, ipr: IPRoute, index: int, peer: _Peer, have: frozenset[Any] = frozenset()) -> None:
        """Write the peer's entries; its route only if not in ``have``, our routes as (dst, gateway, oif)."""
        subnet = str(peer.lease.subnet)
        if peer.mac is None:
            u = self.ctx.underlay
            if (peer.lease.subnet, str(peer.lease.public_ip), u.index) not in have:
                replace_route(ipr, dst=subnet, gateway=str(peer.lease.public_ip), oif=u.index)
            return
        gateway = str(peer.gateway)
        ipr.neigh("replace", dst=gateway, lladdr=peer.mac, ifindex=index, state=NUD_PERMANENT)
        ipr.fdb(
            "replace",
            ifindex=index,
            lladdr=peer.mac,
            dst=str(peer.lease.public_ip),
            state=NUD_PERMANENT | NUD_NOARP,
            flags=NTF_SELF,
        )
        if (peer.lease.subnet, gateway, index) not in have:
            replace_route(ipr, dst=subnet, gateway=gateway, oif=index, flags=RTNH_F_ONLINK)

    def _erase_peer(self, ipr: IPRoute, index: int | None, peer: _Peer) -> None:
        subnet = str(peer.lease.subnet)
        if peer.mac is None:
            u = self.ctx.underlay
            delete_route(ipr, dst=subnet, gateway=str(peer.lease.public_ip), oif=u.index)
            return
        if index is None:  # the device is gone and took the entries with it
            return
        delete_route(ipr, dst=subnet, gateway=str(peer.gateway), oif=index)
        gone = (errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EINVAL)
        try:
            ipr.fdb("del", ifindex=index, lladdr=peer.mac, dst=str(peer.lease.public_ip))
        except NetlinkError as e:
            if e.code not in gone:
                raise
        try:
            ipr.neigh("del", dst=str(peer.gateway), ifindex=index)
        except NetlinkError as e:
            if e.code not in gone:
                raise

    def _prune(self, ipr: IPRoute, index: int) -> list[IPv4Network]:
        """Delete routes into the overlay on our device (or, direct, on the underlay) no peer owns."""
        network = self.ctx.network.network
        # Overlay routes on the underlay are ours only when DirectRouting writes them.
        oifs = (index, self.ctx.underlay.index) if self.options.direct_routing else (index,)
        pruned = []
        for oif in oifs:
            for dst, gateway, _ in routes_via(ipr, oif=oif):
                if not dst.subnet_of(network) or gateway is None or dst in self.peers:
                    continue
                delete_route(ipr, dst=str(dst), gateway=gateway, oif=oif)
                pruned.append(dst)
        return pruned

    def _prune_entries(self, ipr: IPRoute, index: int) -> list[str]:
        """Delete FDB and permanent neighbour entries on our device that no current peer owns.

        A reused device keeps what a killed run wrote: an FDB entry still
        sends to a host that is gone, a neighbour entry still answers for
        its subnet. Returns one description per entry deleted.
        """
        fdb = {(p.mac, str(p.lease.public_ip)) for p in self.peers.values() if p.mac}
        neighbours = {(str(p.gateway), p.mac) for p in self.peers.values() if p.mac}
        gone = (errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EINVAL)
        pruned = []
        for entry in ipr.fdb("dump", ifindex=index):
            mac, dst = entry.get_attr("NDA_LLADDR"), entry.get_attr("NDA_DST")
            if entry["ifindex"] != index or dst is None or (mac, dst) in fdb:
                continue
            try:
                ipr.fdb("del", ifindex=index, lladdr=mac, dst=dst)
            except NetlinkError as e:
                if e.code not in gone:
                    raise
            pruned.append(f"FDB entry {mac} -> {dst}")
        for entry in ipr.get_neighbours(family=2, ifindex=index):
            dst, mac = entry.get_attr("NDA_DST"), entry.get_attr("NDA_LLADDR")
            if not entry["state"] & NUD_PERMANENT or (dst, mac) in neighbours:
                continue
            try:
                ipr.neigh("del", dst=dst, ifindex=index)
            except NetlinkError as e:
                if e.code not in gone:
                    raise
            pruned.append(f"neighbour entry {dst} -> {mac}")
        return pruned

    # -- the Backend interface ------------------------------------------------------------------

    async def open(self) -> None:
        """Creates ``tunproxy.<VNI>`` or reuses a fitting leftover (flannel's ensureLink), or ConfigError."""
        async with self._lock:
            _, created = await run_netlink(self._ensure_link)
        o = self.options
        log.info(
            "%s %s: VNI %d, port %d, GBP %s, MTU %d, VtepMAC %s, DirectRouting %s",
            "created" if created else "reusing",
            self.device,
            o.vni,
            o.port,
            "on" if o.gbp else "off",
            o.mtu,
            self.mac,
            "on" if o.direct_routing else "off",
        )

    async def set_subnet(self, subnet: IPv4Network) -> None:
        """Puts the subnet's first address on the device as a /32 (flannel's choice); recreates a lost one."""
        self.subnet = subnet

        def configure(ipr: IPRoute) -> None:
            index = link_index(ipr, self.device)
            if index is None:
                index, _ = self._ensure_link(ipr)
            self._configure_subnet(ipr, index)

        async with self._lock:
            await run_netlink(configure)

    async def add_peer(self, lease: Lease) -> None:
        """PeerRefused for a lease without a unicast VtepMAC, or when the route is someone else's.

        With ``DirectRouting`` a peer on our underlay subnet gets a plain route via
        its PublicIP instead of the three VXLAN entries.
        """
        mac = peer_vtep_mac(lease)
        direct = self.options.direct_routing and routes_directly(lease.public_ip, self.ctx.underlay)
        peer = _Peer(lease, None if direct else mac)

        def write(ipr: IPRoute) -> None:
            old = self.peers.get(lease.subnet)
            index = link_index(ipr, self.device)
            if old is not None and old != peer:
                self._erase_peer(ipr, index, old)
            if index is None:
                index, _ = self._ensure_link(ipr)
                self._configure_subnet(ipr, index)
            self._write_peer(ipr, index, peer)

        async with self._lock:
            try:
                await run_netlink(write)
            except ForeignRoute as e:  # retried at each check, in case its owner deletes it
                raise PeerRefused(str(e)) from None
            self.peers[lease.subnet] = peer
        if direct:
            log.info(
                "peer %s is on %s: routed directly via %s",
                lease.subnet,
                self.ctx.underlay.network,
                lease.public_ip,
            )

    async def remove_peer(self, lease: Lease) -> None:
        """The route, neighbour and FDB entries go, in the reverse of the order they came."""
        async with self._lock:
            peer = self.peers.pop(lease.subnet, None)
            if peer is None:
                return
            await run_netlink(lambda ipr: self._erase_peer(ipr, link_index(ipr, self.device), peer))

    async def check(self) -> None:
        """Recreates a missing or changed device, rewrites every peer, prunes entries of ours no peer owns.

        A device that cannot be restored (ConfigError) is logged once a minute and
        retried at the next check.
        """

        def repair(ipr: IPRoute) -> tuple[bool, list[IPv4Network], list[str]]:
            index, created = self._ensure_link(ipr)
            self._configure_subnet(ipr, index)
            # One dump of our routes instead of a lookup per peer: a route in place is not rewritten.
            have = frozenset(routes_via(ipr, oif=index))
            if self.options.direct_routing:
                have |= frozenset(routes_via(ipr, oif=self.ctx.underlay.index))
            for peer in self.peers.values():
                try:
                    self._write_peer(ipr, index, peer, have)
                except ForeignRoute as e:
                    if self._said.due(peer.lease.subnet, str(e), time.monotonic()):
                        log.warning("peer %s not restored: %s", peer.lease.subnet, e)
            return created, self._prune(ipr, index), self._prune_entries(ipr, index)

        async with self._lock:
            try:
                created, pruned, entries = await run_netlink(repair)
            except ConfigError as e:  # e.g. someone made a clashing device; retried next time
                if self._said.due(self.device, str(e), time.monotonic()):
                    log.error("cannot restore %s: %s", self.device, e)
                return
        self._said.forget(self.device)
        if created:
            log.warning("%s was gone; recreated it with %d peer(s)", self.device, len(self.peers))
        for dst in pruned:
            log.info("removed stale route to %s (no such peer)", dst)
        for what in entries:
            log.info("removed stale %s (no such peer)", what)

    def kept(self) -> Kept:
        """Our device and the peers' routes (on the underlay for directly routed peers)."""
        underlay = self.ctx.underlay.name
        routes = frozenset(
            (p.lease.subnet, underlay if p.mac is None else self.device) for p in self.peers.values()
        )
        return Kept(routes=routes, devices=frozenset({self.device}))

    async def close(self) -> None:
        """Deletes the device, which takes its address, entries and routes, and any direct routes."""

        def teardown(ipr: IPRoute) -> None:
            for peer in self.peers.values():
                if peer.mac is None:
                    self._erase_peer(ipr, None, peer)
            index = link_index(ipr, self.device)
            if index is not None:  # takes its address, neighbours, FDB entries and routes
                try:
                    ipr.link("del", index=index)
                except NetlinkError as e:
                    if e.code != errno.ENODEV:
                        raise

        async with self._lock:
            await run_netlink(teardown)
            self.peers.clear()


BACKEND = VxlanBackend
