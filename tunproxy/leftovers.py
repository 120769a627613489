"""What an earlier tunproxy run left on the host, of any backend, and removing it.

A run killed with SIGKILL cannot clean up, and the next run may use another
backend (``--backend udp`` after ``host-gw``): each backend's own check only
knows its own kind of state, so a host-gw route via a peer would stay, more
specific than the udp network route, and take that peer's traffic. So at
start, once the current backend has applied the first snapshot of leases, the
daemon removes everything of tunproxy's that the current backend does not use.
tunproxy's state is recognisable whatever backend made it:

* routes with protocol ``RTPROT_TUNPROXY`` (116) in the main table;
* VXLAN devices named ``tunproxy.<VNI>`` (or ``tpvx.<VNI>``, see vxlan.device_name);
* the udp backend's TUN (``tunproxy0``, or the ``--tun-name`` given);
* host-gw's address on ``lo``, which carries the label ``lo:tunproxy``.

Nothing else is touched: a route of another protocol, a device of another
name, an address on ``lo`` without the label belong to someone else. One
tunproxy per network namespace is assumed (as one flanneld per host).
"""

from __future__ import annotations

import errno
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .backend_config import DEFAULT_TUN
from .netlink import RT_TABLE_MAIN, RTPROT_TUNPROXY, describe_route

log = logging.getLogger("tunproxy")

LOOPBACK_LABEL = "lo:tunproxy"  # IFA_LABEL must start with the device's name
VXLAN_NAME = re.compile(r"(tunproxy|tpvx)\.\d+")
_GONE = (errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL)


@dataclass(frozen=True)
class Kept:
    """What the running backend uses and the sweep must leave: routes as (destination, device name)."""

    routes: frozenset[tuple[IPv4Network, str]] = frozenset()
    devices: frozenset[str] = frozenset()
    loopback: str | None = None  # the address host-gw keeps on lo
    tun_names: tuple[str, ...] = field(default=(DEFAULT_TUN,))
    """TUN device names a udp run may have left (the default, and a --tun-name given)."""


def stale_devices(links: Iterable[tuple[str, str | None]], kept: Kept) -> list[str]:
    """Names of tunproxy's devices among ``(name, kind)`` that ``kept`` does not use."""
    out = []
    for name, kind in links:
        if name in kept.devices:
            continue
        if (kind == "vxlan" and VXLAN_NAME.fullmatch(name)) or (kind == "tun" and name in kept.tun_names):
            out.append(name)
    return out


def _kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info else None


def sweep(ipr: IPRoute, kept: Kept) -> list[str]:
    """Delete tunproxy's state that ``kept`` does not account for; one description per thing deleted.

    Devices go first (their routes, addresses, FDB and neighbour entries go
    with them), then routes with tunproxy's protocol, then host-gw's
    address on lo. Blocking netlink; run it through ``run_netlink``.
    """
    removed: list[str] = []
    names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    kinds = [(link.get_attr("IFLA_IFNAME"), _kind(link)) for link in ipr.get_links()]
    for name in stale_devices(kinds, kept):
        try:
            ipr.link("del", ifname=name)
        except NetlinkError as e:
            if e.code not in _GONE:
                raise
        removed.append(f"device {name}")
    for msg in ipr.get_routes(family=2, table=RT_TABLE_MAIN, proto=RTPROT_TUNPROXY):
        dst = IPv4Network(f"{msg.get_attr('RTA_DST') or '0.0.0.0'}/{msg['dst_len']}")
        dev = names.get(msg.get_attr("RTA_OIF"), "")
        if (dst, dev) in kept.routes or msg["proto"] != RTPROT_TUNPROXY:
            continue
        what = describe_route(ipr, msg)
        try:
            ipr.route(
                "del",
                dst=str(dst),
                table=RT_TABLE_MAIN,
                proto=RTPROT_TUNPROXY,
                oif=msg.get_attr("RTA_OIF"),
                priority=msg.get_attr("RTA_PRIORITY") or 0,
            )
        except NetlinkError as e:
            if e.code not in _GONE:
                raise
        removed.append(f"route {what}")
    for addr in ipr.get_addr(family=2, label=LOOPBACK_LABEL):
        address = addr.get_attr("IFA_ADDRESS")
        if addr.get_attr("IFA_LABEL") != LOOPBACK_LABEL or address == kept.loopback:
            continue
        try:
            ipr.addr("del", index=addr["index"], address=address, prefixlen=addr["prefixlen"])
        except NetlinkError as e:
            if e.code not in _GONE:
                raise
        removed.append(f"address {address}/{addr['prefixlen']} on lo")
    return removed
