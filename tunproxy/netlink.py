"""Blocking netlink helpers, meant to run in a worker thread.

pyroute2 cannot open its sockets on a uvloop loop (pyroute2 issue 1335) and its
sync API must not be called from inside a running loop, so every function here
is plain and blocking and the async code calls it through ``asyncio.to_thread``.
Each call opens its own ``IPRoute`` so that no socket is shared across threads.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .model import ConfigError

T = TypeVar("T")
log = logging.getLogger("tunproxy")


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
        """The underlay's IPv4 subnet: its address and prefix length, host bits cleared."""
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
    """The index of the link called ``name``, or None if there is none."""
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


@dataclass(frozen=True)
class InterfaceChoice:
    """How to pick the underlay, as flannel's ``--iface``, ``--iface-regex`` and ``--iface-can-reach``.

    ``names`` are interface names or IPv4 addresses (an address selects the
    interface holding it); ``regexes`` are searched first against every
    interface's IPv4 addresses, then against the names; ``can_reach`` picks
    the interface (and source address) the kernel routes that address
    through, like ``ip route get``. Precedence, as flannel's main.go: each
    name in order, then each regex in order, then can_reach; the first that
    resolves wins. All empty: the interface holding ``--public-ip`` if one
    is given, else the default route's.
    """

    names: tuple[str, ...] = ()
    regexes: tuple[str, ...] = ()
    can_reach: IPv4Address | None = None
    labels: tuple[str, str, str] = ("--iface", "--iface-regex", "--iface-can-reach")
    """Where each of the three came from (a flag, or a TUNPROXY_/FLANNELD_ variable), for messages."""

    @property
    def empty(self) -> bool:
        """True if no name, regex or ``can_reach`` was given."""
        return not (self.names or self.regexes or self.can_reach)


class _NoMatch(Exception):
    """One way of choosing the interface found nothing; the message says why."""


def _ipv4_addresses(ipr: IPRoute, index: int) -> list[tuple[str, int]]:
    return [(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(family=2, index=index)]


def _by_name_or_address(ipr: IPRoute, text: str) -> tuple[int, str | None]:
    try:
        address = IPv4Address(text)
    except ValueError:
        index = link_index(ipr, text)
        if index is None:
            raise _NoMatch(f"interface {text!r} does not exist") from None
        return index, None
    addrs = ipr.get_addr(family=2, address=str(address))
    if not addrs:
        raise _NoMatch(f"no interface has the address {address}")
    return addrs[0]["index"], str(address)


def _by_regex(ipr: IPRoute, pattern: str) -> tuple[int, str | None]:
    """flannel's order: the first interface with an IPv4 address matching, then the first name."""
    regex = re.compile(pattern)
    links = sorted((link["index"], link.get_attr("IFLA_IFNAME")) for link in ipr.get_links())
    for index, _ in links:
        for address, _ in _ipv4_addresses(ipr, index):
            if regex.search(address):
                return index, address
    for index, name in links:
        if regex.search(name):
            return index, None
    names = ", ".join(name for _, name in links)
    raise _NoMatch(f"pattern {pattern!r} matches no interface name or address (have {names})")


def _by_route(ipr: IPRoute, destination: IPv4Address) -> tuple[int, str | None]:
    try:
        routes = ipr.route("get", dst=str(destination))
    except NetlinkError as e:
        raise _NoMatch(f"no route to {destination}: {os.strerror(e.code)}") from None
    if not routes or not routes[0].get_attr("RTA_OIF"):
        raise _NoMatch(f"no route to {destination}")
    return routes[0].get_attr("RTA_OIF"), routes[0].get_attr("RTA_PREFSRC")


def find_underlay(iface: InterfaceChoice | str | None, public_ip: IPv4Address | None = None) -> Underlay:
    """The underlay chosen as flannel chooses it (see InterfaceChoice); a plain str is one --iface.

    Raises ConfigError naming everything that was tried when nothing matches,
    or when the chosen interface has no IPv4 address.
    """
    if iface is None:
        choice = InterfaceChoice()
    elif isinstance(iface, str):
        choice = InterfaceChoice(names=(iface,))
    else:
        choice = iface

    def pick(ipr: IPRoute) -> tuple[int, str | None]:
        if choice.empty:
            if public_ip:
                try:
                    return _by_name_or_address(ipr, str(public_ip))
                except _NoMatch as e:
                    raise ConfigError(f"{e} (--public-ip); pass --iface") from None
            routes = ipr.get_default_routes(family=2)
            if not routes or not routes[0].get_attr("RTA_OIF"):
                raise ConfigError("no default route to pick an interface from; pass --iface")
            return routes[0].get_attr("RTA_OIF"), None
        attempts: list[tuple[str, Callable[[], tuple[int, str | None]]]] = []
        by_name, by_regex, by_route = choice.labels
        for name in choice.names:
            attempts.append((f"{by_name} {name}", functools.partial(_by_name_or_address, ipr, name)))
        for pattern in choice.regexes:
            attempts.append((f"{by_regex} {pattern}", functools.partial(_by_regex, ipr, pattern)))
        if choice.can_reach:
            reach = choice.can_reach
            attempts.append((f"{by_route} {reach}", functools.partial(_by_route, ipr, reach)))
        failures = []
        for what, attempt in attempts:
            try:
                return attempt()
            except _NoMatch as e:
                log.debug("%s: %s", what, e)
                failures.append(f"{what}: {e}")
        if len(failures) == 1 and choice.names:  # the common case keeps its plain message
            what, _, why = failures[0].partition(": ")
            raise ConfigError(why if by_name == "--iface" else f"{why} ({what})")
        raise ConfigError(f"no interface matches: {'; '.join(failures)}")

    def lookup(ipr: IPRoute) -> Underlay:
        index, address = pick(ipr)
        link = ipr.get_links(index)[0]
        name = link.get_attr("IFLA_IFNAME")
        addrs = _ipv4_addresses(ipr, index)
        if not addrs:
            raise ConfigError(f"interface {name!r} has no IPv4 address")
        want = address or (str(public_ip) if public_ip else None)
        chosen = next((a for a in addrs if a[0] == want), addrs[0])
        return Underlay(name, index, IPv4Address(chosen[0]), chosen[1], link.get_attr("IFLA_MTU"))

    return with_ipr(lookup)


RTPROT_TUNPROXY = 116
"""The routing protocol number on every route tunproxy installs (``ip route show proto 116``).

Linux keeps the number with the route (``rtm_protocol``, linux/rtnetlink.h)
and never acts on it; 0 to 4 are the kernel's and iproute2's rt_protos names
others (zebra 11, bird 12, dhcp 16, babel 42, bgp 186, ...). 116 (0x74, "t",
as in the VtepMAC prefix) is in none of those lists. It is how tunproxy tells
its own routes (a killed run's, another backend's) from an operator's: it
replaces or deletes only routes that carry it.
"""

RT_TABLE_MAIN = 254
RT_SCOPE_LINK = 253  # linux/rtnetlink.h: a route to hosts on the link itself
RTM_F_FIB_MATCH = 0x2000  # linux/rtnetlink.h: "route get" returns the matching FIB entry
_PROTO_NAMES = {0: "unspec", 1: "redirect", 2: "kernel", 3: "boot", 4: "static", 16: "dhcp"}


class ForeignRoute(ConfigError):
    """A route tunproxy would install has the same destination as one it did not make.

    The message names that route and its device, for one line. tunproxy never
    replaces such a route (it would be lost when tunproxy stops).
    """


def describe_route(ipr: IPRoute, msg: Any) -> str:
    """``10.100.0.0/16 via 192.0.2.1 dev eth1 proto boot``, as ``ip route`` prints it."""
    text = f"{msg.get_attr('RTA_DST') or '0.0.0.0'}/{msg['dst_len']}"
    if msg.get_attr("RTA_GATEWAY"):
        text += f" via {msg.get_attr('RTA_GATEWAY')}"
    oif = msg.get_attr("RTA_OIF")
    if oif:
        links = ipr.get_links(oif)
        text += f" dev {links[0].get_attr('IFLA_IFNAME') if links else oif}"
    proto = msg["proto"]
    return f"{text} proto {_PROTO_NAMES.get(proto, proto)}"


def _same_route(msg: Any, dst: IPv4Network, priority: int) -> bool:
    return (
        msg.get_attr("RTA_TABLE", msg["table"]) == RT_TABLE_MAIN
        and msg["dst_len"] == dst.prefixlen
        and (msg.get_attr("RTA_DST") or "0.0.0.0") == str(dst.network_address)
        and (msg.get_attr("RTA_PRIORITY") or 0) == priority
    )


def existing_route(ipr: IPRoute, dst: IPv4Network, priority: int = 0) -> Any:
    """The main table's route to exactly ``dst`` with this metric, or None.

    One ``route get fibmatch`` answers in the usual case; a dump of the main
    table when a more specific route or another metric hides it.
    """
    try:
        for msg in ipr.route("get", dst=str(dst.network_address), flags=RTM_F_FIB_MATCH):
            if _same_route(msg, dst, priority):
                return msg
    except NetlinkError:
        pass
    routes = ipr.get_routes(family=2, table=RT_TABLE_MAIN)
    return next((m for m in routes if _same_route(m, dst, priority)), None)


def replace_route(ipr: IPRoute, **route: Any) -> None:
    """Install one of our routes (proto ``RTPROT_TUNPROXY``), or update ours to the same destination.

    Raises ForeignRoute, and changes nothing, when the main table already
    has a route to that destination and metric that tunproxy did not make.
    """
    route.setdefault("proto", RTPROT_TUNPROXY)
    try:
        ipr.route("add", **route)
        return
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise
    dst = IPv4Network(route["dst"])
    found = existing_route(ipr, dst, route.get("priority", 0))
    if found is not None and found["proto"] != RTPROT_TUNPROXY:
        raise ForeignRoute(
            f"a route tunproxy did not make is in the way: {describe_route(ipr, found)}; "
            f"tunproxy will not replace it (delete it, or keep the overlay off {dst})"
        )
    ipr.route("replace", **route)


def delete_route(ipr: IPRoute, **route: Any) -> None:
    """Delete one of our routes; one that is gone, or is not ours, is left alone (ESRCH).

    The kernel matches ``proto`` on delete, so a route tunproxy did not make
    is never deleted here.
    """
    route.setdefault("proto", RTPROT_TUNPROXY)
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


def delete_tun(name: str) -> None:
    """Delete the TUN ``name`` (a killed run's) if it exists; blocking.

    A link of that name that is not a TUN (``--tun-name eth0``) is never
    touched: ConfigError naming it and its kind. OSError if netlink refuses.
    """

    def drop(ipr: IPRoute) -> None:
        index = link_index(ipr, name)
        if index is None:
            return
        links = ipr.get_links(index)
        info = links[0].get_attr("IFLA_LINKINFO") if links else None
        kind = info.get_attr("IFLA_INFO_KIND") if info else None
        if kind != "tun":
            raise ConfigError(
                f"--tun-name {name} is an existing {kind or 'physical'} device, not a TUN; "
                "tunproxy will not delete it (choose another --tun-name)"
            )
        try:
            ipr.link("del", index=index)
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise

    with_ipr(drop)


def routes_via(ipr: IPRoute, **match: Any) -> list[tuple[IPv4Network, str | None, int | None]]:
    """(destination, gateway, oif) for the main table's IPv4 routes of ours matching the filter."""
    match.setdefault("proto", RTPROT_TUNPROXY)
    out = []
    for r in ipr.get_routes(family=2, table=RT_TABLE_MAIN, **match):
        dst = r.get_attr("RTA_DST")
        if dst is None:
            continue
        out.append((IPv4Network(f"{dst}/{r['dst_len']}"), r.get_attr("RTA_GATEWAY"), r.get_attr("RTA_OIF")))
    return out
