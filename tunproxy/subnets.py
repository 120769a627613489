"""Value types for the overlay: the network config, subnets and leases.

Everything here is pure: parse, validate, compare. Nothing touches a socket,
a device or etcd, so all of it is tested without root. Each type validates
on construction and raises ``ConfigError`` or ``LeaseError`` with a message
that can be shown to a user as one line.

The rules follow flannel (pkg/subnet/config.go) so that an operator's
existing ``/coreos.com/network/config`` means the same thing here.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

DEFAULT_BACKEND = "udp"
KNOWN_BACKENDS = ("udp", "vxlan", "host-gw")
UDP_DEFAULT_PORT = 8285  # flannel's udp default
VXLAN_DEFAULT_PORT = 8472  # the kernel's (and flannel's) default, not IANA's 4789
VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
MAX_VNI = (1 << 24) - 1
MIN_MTU = 68  # RFC 791: every IPv4 link carries 68 bytes

# net-conf fields flannel knows and tunproxy does not use: one warning each, never silence.
_IPV4_ONLY = "tunproxy carries IPv4 only"
IGNORED_FIELDS = {
    "EnableIPv6": _IPV4_ONLY,
    "IPv6Network": _IPV4_ONLY,
    "IPv6SubnetLen": _IPV4_ONLY,
    "IPv6SubnetMin": _IPV4_ONLY,
    "IPv6SubnetMax": _IPV4_ONLY,
    "IPv6Networks": _IPV4_ONLY,
    "Networks": "flannel's MultiClusterCIDR list (Kubernetes only); tunproxy uses Network",
    "EnableNFTables": "tunproxy's --ip-masq rules are always nftables",
}
_FIELDS = ("Network", "SubnetLen", "SubnetMin", "SubnetMax", "Backend", "EnableIPv4", *IGNORED_FIELDS)
BACKEND_FIELDS = {
    "udp": ("Type", "Port"),
    "vxlan": ("Type", "VNI", "Port", "GBP", "DirectRouting", "MTU", "Learning", "MacPrefix"),
    "host-gw": ("Type",),
}


def go_keys(doc: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """``doc`` with keys renamed to ``names`` as Go's encoding/json matches them: exactly, else ignoring case.

    flanneld decodes net-conf.json with encoding/json, so ``"network"`` or
    ``"backend": {"type": "vxlan"}`` mean Network and Backend.Type there;
    they must here too. An exact match wins over a case-folded one.
    """
    canonical = {name.casefold(): name for name in names}
    out: dict[str, Any] = {}
    for key, value in doc.items():
        name = canonical.get(key.casefold(), key) if isinstance(key, str) else key
        if name in out and key != name and name in doc:
            continue  # the exact spelling is also there: it wins
        out[name] = value
    return out


class ConfigError(ValueError):
    """A network config, CIDR or peer list that cannot be used; the message is user-facing."""


class LeaseError(ValueError):
    """A lease value or key that does not parse; the message is user-facing."""


def parse_network(text: str, what: str = "network") -> IPv4Network:
    """Parse an IPv4 CIDR, refusing host bits and IPv6, with a one-line error."""
    try:
        net = ipaddress.ip_network(str(text).strip(), strict=False)
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not an IPv4 CIDR like 10.100.0.0/16") from None
    if not isinstance(net, IPv4Network):
        raise ConfigError(f"{what} {text!r} is IPv6; tunproxy carries IPv4 only")
    if "/" not in str(text):
        raise ConfigError(f"{what} {text!r} has no prefix length (write it as {net})")
    if net.network_address != ipaddress.ip_interface(str(text).strip()).ip:
        raise ConfigError(f"{what} {text!r} has host bits set (did you mean {net}?)")
    return net


def parse_address(text: str, what: str = "address") -> IPv4Address:
    try:
        addr = ipaddress.ip_address(str(text).strip())
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not an IPv4 address") from None
    if not isinstance(addr, IPv4Address):
        raise ConfigError(f"{what} {text!r} is IPv6; tunproxy carries IPv4 only")
    return addr


def subnet_key(subnet: IPv4Network) -> str:
    """flannel's key form of a subnet: 10.100.5.0/24 -> '10.100.5.0-24'."""
    return f"{subnet.network_address}-{subnet.prefixlen}"


def parse_subnet_key(key: str) -> IPv4Network:
    """The inverse of subnet_key; accepts a full etcd key and uses its last component."""
    name = key.rstrip("/").rsplit("/", 1)[-1]
    addr, sep, plen = name.partition("-")
    if not sep or not plen.isdigit():
        raise LeaseError(f"lease key {key!r} is not of the form 10.100.5.0-24")
    try:
        return parse_network(f"{addr}/{plen}", "lease subnet")
    except ConfigError as e:
        raise LeaseError(str(e)) from None


@dataclass(frozen=True)
class NetworkConfig:
    """flannel's net-conf.json, validated, with defaults filled in as flannel fills them."""

    network: IPv4Network
    subnet_len: int
    subnet_min: IPv4Address
    subnet_max: IPv4Address
    backend_type: str = DEFAULT_BACKEND
    backend: Mapping[str, Any] = field(default_factory=dict, compare=True, hash=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)
    """One line for each field or Backend option that is flannel's but has no effect here."""

    @classmethod
    def parse(cls, raw: str | bytes | Mapping[str, Any]) -> NetworkConfig:
        """Parse and validate a net-conf JSON document (text or already decoded)."""
        if isinstance(raw, (str, bytes)):
            try:
                doc = json.loads(raw)
            except ValueError as e:
                raise ConfigError(f"network config is not valid JSON: {e}") from None
        else:
            doc = raw
        if not isinstance(doc, Mapping):
            raise ConfigError("network config must be a JSON object")
        doc = go_keys(doc, _FIELDS)
        if "Network" not in doc:
            raise ConfigError('network config has no "Network" (e.g. "10.100.0.0/16")')
        network = parse_network(doc["Network"], "Network")
        if network.prefixlen == 0:  # flannel takes 0.0.0.0/0 for no Network at all (IP4Net.Empty)
            raise ConfigError(
                f"Network {network} covers every address, the default route too; "
                "give the overlay its own range, e.g. 10.100.0.0/16"
            )

        backend = doc.get("Backend") or {}
        if not isinstance(backend, Mapping):
            raise ConfigError('"Backend" must be a JSON object like {"Type": "udp"}')
        backend = go_keys(backend, ("Type",))
        backend_type = backend.get("Type") or DEFAULT_BACKEND
        if isinstance(backend_type, str):
            backend = go_keys(backend, BACKEND_FIELDS.get(backend_type, ("Type",)))
        if backend_type not in KNOWN_BACKENDS:
            raise ConfigError(f"Backend.Type {backend_type!r} is not one of {', '.join(KNOWN_BACKENDS)}")
        options = {k: v for k, v in backend.items() if k != "Type"}
        warnings = _top_level_warnings(doc) + check_backend_options(backend_type, options)

        subnet_len = _int_field(doc, "SubnetLen", 0)
        if subnet_len:
            if subnet_len > 30:
                raise ConfigError("SubnetLen must be /30 or shorter")
            if subnet_len < network.prefixlen + 2:
                raise ConfigError(f"SubnetLen /{subnet_len} leaves fewer than four subnets in {network}")
        elif network.prefixlen > 28:
            raise ConfigError(f"Network {network} is too small; the smallest useful is a /28")
        elif network.prefixlen <= 22:
            subnet_len = 24
        else:
            subnet_len = network.prefixlen + 2

        size = 1 << (32 - subnet_len)
        base = int(network.network_address)
        subnet_min = _bound(doc, "SubnetMin", network, IPv4Address(base + size))
        subnet_max = _bound(doc, "SubnetMax", network, IPv4Address(base + network.num_addresses - size))
        for name, value in (("SubnetMin", subnet_min), ("SubnetMax", subnet_max)):
            if int(value) % size:
                raise ConfigError(f"{name} {value} is not on a /{subnet_len} boundary")
        if subnet_min > subnet_max:
            raise ConfigError(f"SubnetMin {subnet_min} is above SubnetMax {subnet_max}")
        return cls(network, subnet_len, subnet_min, subnet_max, backend_type, options, tuple(warnings))

    def to_json(self) -> str:
        backend = {"Type": self.backend_type, **self.backend}
        return json.dumps(
            {
                "Network": str(self.network),
                "SubnetLen": self.subnet_len,
                "SubnetMin": str(self.subnet_min),
                "SubnetMax": str(self.subnet_max),
                "Backend": backend,
            }
        )

    def candidate_subnets(self) -> Iterator[IPv4Network]:
        """Every subnet a host may lease, SubnetMin to SubnetMax inclusive, in order."""
        size = 1 << (32 - self.subnet_len)
        for start in range(int(self.subnet_min), int(self.subnet_max) + 1, size):
            yield IPv4Network((start, self.subnet_len))

    def check_subnet(self, subnet: IPv4Network, what: str = "subnet") -> None:
        """Refuse a subnet outside the network or not aligned to it; used for --subnet."""
        if not subnet.subnet_of(self.network):
            raise ConfigError(f"{what} {subnet} is outside the network {self.network}")
        if subnet.prefixlen < self.network.prefixlen:
            raise ConfigError(f"{what} {subnet} is wider than the network {self.network}")

    def fits(self, subnet: IPv4Network) -> bool:
        """True if an existing lease is still valid under this config (flannel's reuse rule)."""
        return (
            subnet.prefixlen == self.subnet_len
            and subnet.subnet_of(self.network)
            and self.subnet_min <= subnet.network_address <= self.subnet_max
        )


def _top_level_warnings(doc: Mapping[str, Any]) -> list[str]:
    """flannel's fields tunproxy does not use, and fields flannel does not know (flannel is silent)."""
    enable_ipv4 = doc.get("EnableIPv4", True)
    if not isinstance(enable_ipv4, bool):
        raise ConfigError(f"EnableIPv4 must be true or false, not {enable_ipv4!r}")
    if not enable_ipv4:
        raise ConfigError(f"EnableIPv4 is false, but {_IPV4_ONLY}")
    warnings = []
    for name, value in doc.items():
        if name in IGNORED_FIELDS:
            if value not in (False, None, "", [], 0):  # "EnableIPv6": false asks for nothing
                warnings.append(f"ignoring {name}: {IGNORED_FIELDS[name]}")
        elif name not in _FIELDS:
            warnings.append(f"ignoring {name}: not a flannel network config field")
    return warnings


def int_option(options: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    """A Backend integer option; JSON true/false or 1.5 is refused rather than coerced."""
    value = options.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"Backend.{key} must be an integer from {low} to {high}, not {value!r}")
    return value


def bool_option(options: Mapping[str, Any], key: str) -> bool:
    value = options.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ConfigError(f"Backend.{key} must be true or false, not {value!r}")
    return value


def check_backend_options(backend_type: str, options: Mapping[str, Any]) -> list[str]:
    """Validate the ``Backend`` options flannel documents for this type; warnings for the rest.

    Types, ranges and defaults as flannel's (Documentation/backends.md): udp
    ``Port`` (8285); vxlan ``VNI`` (1), ``Port`` (8472, 0 meaning the
    default), ``GBP``, ``DirectRouting``, ``MTU`` (of the encapsulated packets:
    the device gets MTU - 50, so at least 118), ``Learning`` (refused quietly:
    tunproxy writes every entry), ``MacPrefix`` (Windows only); host-gw none.
    The MTU's upper bound depends on the underlay and is the backend's check.
    """
    warnings = []
    if backend_type == "udp":
        int_option(options, "Port", UDP_DEFAULT_PORT, 0, 65535)
        known: tuple[str, ...] = ("Port",)
    elif backend_type == "vxlan":
        int_option(options, "VNI", 1, 0, MAX_VNI)
        int_option(options, "Port", VXLAN_DEFAULT_PORT, 0, 65535)
        int_option(options, "MTU", 1500, MIN_MTU + VXLAN_OVERHEAD, 65535)
        for key in ("GBP", "DirectRouting", "Learning"):
            bool_option(options, key)
        if options.get("Learning"):
            warnings.append(
                "ignoring Backend.Learning: tunproxy writes every neighbour and FDB entry, learning stays off"
            )
        if "MacPrefix" in options:
            warnings.append("ignoring Backend.MacPrefix: flannel uses it on Windows only")
        known = ("VNI", "Port", "GBP", "DirectRouting", "MTU", "Learning", "MacPrefix")
    else:
        known = ()
    for key in options:
        if key not in known:
            warnings.append(f"ignoring Backend.{key}: not an option of the {backend_type} backend")
    return warnings


def udp_port(
    options: Mapping[str, Any], flag: int | None, flag_name: str = "--port"
) -> tuple[int, str | None]:
    """The udp backend's port: the command line's, else ``Backend.Port``, else 8285 (0 is the default).

    Returns the port and a warning when the command line overrides a
    different ``Backend.Port`` (every host must use the same port).
    """
    configured = int_option(options, "Port", UDP_DEFAULT_PORT, 0, 65535) or UDP_DEFAULT_PORT
    if flag is None:
        return configured, None
    if "Port" in options and configured != flag:
        return flag, f"{flag_name} {flag} overrides Backend.Port {configured}; every host must use one port"
    return flag, None


def _int_field(doc: Mapping[str, Any], name: str, default: int) -> int:
    value = doc.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be a non-negative integer, not {value!r}")
    return value


def _bound(doc: Mapping[str, Any], name: str, network: IPv4Network, default: IPv4Address) -> IPv4Address:
    if not doc.get(name):
        return default
    value = parse_address(doc[name], name)
    if value not in network:
        raise ConfigError(f"{name} {value} is not in the range of the Network {network}")
    return value


@dataclass(frozen=True)
class Lease:
    """One host's claim on a subnet: where to send its traffic and how.

    ``expiration`` is wall-clock seconds (etcd's lease deadline) and is not part
    of equality: a renewed lease is the same lease.
    """

    subnet: IPv4Network
    public_ip: IPv4Address
    backend_type: str = DEFAULT_BACKEND
    backend_data: Any = field(default=None, hash=False)
    expiration: float | None = field(default=None, compare=False)

    @classmethod
    def parse(cls, key: str, value: bytes | str, expiration: float | None = None) -> Lease:
        """Parse flannel's lease value ``{"PublicIP": ..., "BackendType": ..., "BackendData": ...}``."""
        subnet = parse_subnet_key(key)
        try:
            doc = json.loads(value)
        except ValueError:
            raise LeaseError(f"lease {subnet_key(subnet)} is not JSON: {value[:60]!r}") from None
        if not isinstance(doc, Mapping) or "PublicIP" not in doc:
            raise LeaseError(f"lease {subnet_key(subnet)} has no PublicIP: {str(doc)[:60]}")
        try:
            public_ip = parse_address(doc["PublicIP"], "PublicIP")
        except ConfigError as e:
            raise LeaseError(f"lease {subnet_key(subnet)}: {e}") from None
        backend_type = doc.get("BackendType") or DEFAULT_BACKEND
        if not isinstance(backend_type, str):
            raise LeaseError(f"lease {subnet_key(subnet)}: BackendType must be a string")
        return cls(subnet, public_ip, backend_type, doc.get("BackendData"), expiration)

    def to_json(self) -> str:
        doc: dict[str, Any] = {"PublicIP": str(self.public_ip), "BackendType": self.backend_type}
        if self.backend_data is not None:
            doc["BackendData"] = self.backend_data
        return json.dumps(doc, sort_keys=True)


def check_peers(own: IPv4Network, network: IPv4Network, peers: Mapping[IPv4Network, IPv4Address]) -> None:
    """Refuse a static peer list that would misroute: outside the network, ours, or overlapping."""
    seen: list[IPv4Network] = [own]
    for subnet, public_ip in sorted(peers.items()):
        if not subnet.subnet_of(network):
            raise ConfigError(f"peer {public_ip}={subnet} is outside the network {network}")
        for other in seen:
            if subnet.overlaps(other):
                whose = "our own subnet" if other == own else f"peer subnet {other}"
                raise ConfigError(f"peer {public_ip}={subnet} overlaps {whose}")
        seen.append(subnet)
