"""Blocking netlink helpers, meant to run in a worker thread.

pyroute2 cannot open its sockets on a uvloop loop (pyroute2 issue 1335) and its
sync API must not be called from inside a running loop, so every function here
is plain and blocking and the async code calls it through ``asyncio.to_thread``.
Each call opens its own ``IPRoute`` so that no socket is shared across threads.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .subnets import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Underlay:
    """The host interface that carries the overlay's encapsulated traffic."""

    name: str
    index: int
    address: IPv4Address
    prefixlen: int
    mtu: int

    @property
    def network(self) -> IPv4Network:
        return IPv4Network((self.address, self.prefixlen), strict=False)


def with_ipr(fn: Callable[[IPRoute], T]) -> T:
    """Run fn with a fresh IPRoute; a NetlinkError comes out as the OSError it is.

    The daemon logs an OSError from one peer's add/remove in one line and goes
    on; pyroute2's NetlinkError is not an OSError and would stop it.
    """
    try:
        with IPRoute() as ipr:
            return fn(ipr)
    except NetlinkError as e:
        raise OSError(e.code, f"netlink: {os.strerror(e.code)}") from None


async def run_netlink(fn: Callable[[IPRoute], T]) -> T:
    """with_ipr in a worker thread: the only way async code here touches netlink."""
    return await asyncio.to_thread(with_ipr, fn)


def link_index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def find_underlay(iface: str | None, public_ip: IPv4Address | None = None) -> Underlay:
    """The named interface, or the one holding public_ip, or the default route's."""

    def lookup(ipr: IPRoute) -> Underlay:
        if iface:
            index = link_index(ipr, iface)
            if index is None:
                raise ConfigError(f"interface {iface!r} does not exist")
        elif public_ip:
            addrs = ipr.get_addr(family=2, address=str(public_ip))
            if not addrs:
                raise ConfigError(f"no interface has the address {public_ip}; pass --iface")
            index = addrs[0]["index"]
        else:
            routes = ipr.get_default_routes(family=2)
            if not routes or not routes[0].get_attr("RTA_OIF"):
                raise ConfigError("no default route to pick an interface from; pass --iface")
            index = routes[0].get_attr("RTA_OIF")
        link = ipr.get_links(index)[0]
        name = link.get_attr("IFLA_IFNAME")
        addrs = [(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(family=2, index=index)]
        if not addrs:
            raise ConfigError(f"interface {name!r} has no IPv4 address")
        chosen = next((a for a in addrs if public_ip and a[0] == str(public_ip)), addrs[0])
        return Underlay(name, index, IPv4Address(chosen[0]), chosen[1], link.get_attr("IFLA_MTU"))

    return with_ipr(lookup)


def replace_route(ipr: IPRoute, **route: Any) -> None:
    ipr.route("replace", **route)


def delete_route(ipr: IPRoute, **route: Any) -> None:
    """Delete a route; one that is already gone is fine (we are converging, not asserting)."""
    try:
        ipr.route("del", **route)
    except NetlinkError as e:
        if e.code not in (errno.ESRCH, errno.ENOENT, errno.ENODEV):
            raise


def ensure_address(ipr: IPRoute, index: int, address: IPv4Address, prefixlen: int) -> None:
    """Make ``address/prefixlen`` the only IPv4 address on the link."""
    want = (str(address), prefixlen)
    for a in ipr.get_addr(family=2, index=index):
        have = (a.get_attr("IFA_ADDRESS"), a["prefixlen"])
        if have != want:
            ipr.addr("del", index=index, address=have[0], prefixlen=have[1])
    try:
        ipr.addr("add", index=index, address=want[0], prefixlen=prefixlen)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise


def delete_link(name: str) -> None:
    def drop(ipr: IPRoute) -> None:
        index = link_index(ipr, name)
        if index is not None:
            try:
                ipr.link("del", index=index)
            except NetlinkError as e:
                if e.code != errno.ENODEV:
                    raise

    with_ipr(drop)


def routes_via(ipr: IPRoute, **match: Any) -> list[tuple[IPv4Network, str | None, int | None]]:
    """(destination, gateway, oif) for the main table's IPv4 routes matching the filter."""
    out = []
    for r in ipr.get_routes(family=2, **match):
        dst = r.get_attr("RTA_DST")
        if dst is None:
            continue
        out.append((IPv4Network(f"{dst}/{r['dst_len']}"), r.get_attr("RTA_GATEWAY"), r.get_attr("RTA_OIF")))
    return out
