"""The backends' rules, as pure functions: the vxlan device's name and settings, VTEP MACs and
peers; which peers host-gw can route; how a burst of leases fits the udp route table. No
netlink and no sockets (the exceptions they return are backends.base's).

Pure, so each is unit-tested without root; ``backends/vxlan.py``,
``host_gw.py`` and ``udp.py`` apply them. The MAC scheme and the MTU meaning
follow flannel (see each docstring).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import TYPE_CHECKING, Any

from ..backend_config import MIN_MTU, VXLAN_DEFAULT_PORT, VXLAN_DEFAULT_VNI, VXLAN_OVERHEAD, VxlanOptions
from ..model import ConfigError, Lease
from .base import PeerRefused, RouteTableFull

if TYPE_CHECKING:
    from ..netlink import Underlay

IFNAMSIZ = 15
MAC_PREFIX = (0x0E, 0x74)  # 0x0e: locally administered, unicast; 0x74: "t"

MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")


def vtep_mac(public_ip: IPv4Address) -> str:
    """The VTEP MAC of the host with this public IP: ``0e:74`` and the address's four bytes.

    The public IP is unique on the underlay, so the MAC is unique in the
    overlay's L2 domain; it does not depend on the VNI, so a static peer's
    MAC is known from its address alone, whatever config it runs with.
    """
    return ":".join(f"{b:02x}" for b in (*MAC_PREFIX, *public_ip.packed))


def device_name(vni: int) -> str:
    """``tunproxy.<VNI>``; a VNI too long for IFNAMSIZ gets the shorter ``tpvx.<VNI>``."""
    name = f"tunproxy.{vni}"
    return name if len(name) <= IFNAMSIZ else f"tpvx.{vni}"


@dataclass(frozen=True)
class VxlanSettings:
    """The vxlan device as this host builds it: the typed ``Backend`` options settled against the underlay.

    ``mtu`` is the device's MTU (what FLANNEL_MTU says). flannel's ``MTU``
    option is the MTU of the encapsulated packets on the underlay, so the
    device gets ``MTU - 50``; the default is the underlay's MTU, giving
    1450 on a 1500-byte underlay. ``clamped_from`` is a requested ``MTU``
    above the underlay's, lowered to it (encapsulated packets would not fit).
    """

    vni: int = VXLAN_DEFAULT_VNI
    port: int = VXLAN_DEFAULT_PORT
    gbp: bool = False
    direct_routing: bool = False
    mtu: int = 1500 - VXLAN_OVERHEAD
    clamped_from: int | None = None

    @classmethod
    def settle(cls, options: VxlanOptions, underlay_mtu: int) -> VxlanSettings:
        """ConfigError if the underlay's MTU cannot carry VXLAN at all."""
        if underlay_mtu - VXLAN_OVERHEAD < MIN_MTU:
            raise ConfigError(
                f"the underlay MTU {underlay_mtu} is too small for VXLAN (needs {MIN_MTU + VXLAN_OVERHEAD})"
            )
        transport = options.mtu or underlay_mtu
        return cls(
            vni=options.vni,
            port=options.port,
            gbp=options.gbp,
            direct_routing=options.direct_routing,
            mtu=min(transport, underlay_mtu) - VXLAN_OVERHEAD,
            clamped_from=transport if transport > underlay_mtu else None,
        )


def peer_vtep_mac(lease: Lease) -> str:
    """The VtepMAC a peer's lease advertises, or PeerRefused saying what is wrong with it."""
    data = lease.backend_data
    if not isinstance(data, Mapping) or "VtepMAC" not in data:
        raise PeerRefused(f"its lease has no VtepMAC in BackendData ({str(data)[:60]})")
    mac = data["VtepMAC"]
    if not isinstance(mac, str) or not MAC_RE.fullmatch(mac):
        raise PeerRefused(f"its VtepMAC {mac!r} is not a MAC address")
    octets = bytes.fromhex(mac.replace(":", ""))
    if octets[0] & 1 or octets == bytes(6):
        raise PeerRefused(f"its VtepMAC {mac} is not a unicast address")
    return mac.lower()


def routes_directly(public_ip: IPv4Address, underlay: Underlay) -> bool:
    """DirectRouting's test: the peer is on our underlay subnet, so a plain route reaches it."""
    return public_ip in underlay.network and public_ip != underlay.address


def link_mismatch(info: Mapping[str, Any], want: Mapping[str, Any]) -> list[str]:
    """What makes an existing device unusable: ``key have != want`` for each difference."""
    return [f"{k} {info.get(k)!r} != {v!r}" for k, v in want.items() if info.get(k) != v]


def host_gw_refusal(public_ip: IPv4Address, underlay: Underlay) -> str | None:
    """Why host-gw cannot route to a peer at ``public_ip``, or None if it can: the peer must be
    on our link (flannel's host-gw needs one L2 segment) and not ourselves."""
    if public_ip not in underlay.network:
        return f"host-gw needs peers on one L2 segment; {public_ip} is not in {underlay.network}"
    if public_ip == underlay.address:
        return f"{public_ip} is our own address"
    return None


def fit_routes(
    routes: Mapping[IPv4Network, IPv4Address],
    removed: Sequence[Lease],
    added: Sequence[Lease],
    max_routes: int,
) -> tuple[set[IPv4Network], dict[IPv4Network, IPv4Address], list[tuple[Lease, Exception]]]:
    """How a burst changes the udp route table ``routes`` (subnet -> peer), at most ``max_routes``
    long: the subnets to remove (those of ``removed`` it holds), the routes to add or repoint,
    and the additions that do not fit, each with ``RouteTableFull``. Removals count first."""
    gone = {lease.subnet for lease in removed if lease.subnet in routes}
    size = len(routes) - len(gone)
    fresh: dict[IPv4Network, IPv4Address] = {}
    failures: list[tuple[Lease, Exception]] = []
    for lease in added:
        if not (lease.subnet in fresh or (lease.subnet in routes and lease.subnet not in gone)):
            if size >= max_routes:
                failures.append((lease, RouteTableFull(f"route table full ({max_routes} routes)")))
                continue
            size += 1
        fresh[lease.subnet] = lease.public_ip
    return gone, fresh, failures
