"""The model: the frozen values every layer speaks in.

``NetworkConfig`` (flannel's net-conf.json), ``Lease`` (one host's claim on a
subnet) and the lease events a registry reports (``LeaseAdded`` carries the
lease, ``LeaseRemoved`` just the subnet), plus the parsers of CIDRs,
addresses and flannel's subnet keys (``10.100.5.0-24``), each run once where
text enters.

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
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from .backend_config import (
    BACKEND_TYPES,
    DEFAULT_BACKEND,
    BackendOptions,
    ConfigError,
    UdpOptions,
    parse_backend,
)

# The daemon's timings (--stats-interval, --check-interval), in seconds: the defaults of its
# options and of their flags.
STATS_INTERVAL = 60.0  # between counter summaries in the log
CHECK_INTERVAL = 10.0  # between checks that repair what was removed behind our back

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
    """``text`` (stripped) as an IPv4 address; ConfigError naming ``what`` if it is not one, or is IPv6."""
    try:
        addr = ipaddress.ip_address(str(text).strip())
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not an IPv4 address") from None
    if not isinstance(addr, IPv4Address):
        raise ConfigError(f"{what} {text!r} is IPv6; tunproxy carries IPv4 only")
    return addr


def can_be_public_ip(addr: IPv4Address) -> bool:
    """Whether ``addr`` can be a host's PublicIP, a destination for the overlay's packets: not
    0.0.0.0 (RFC 1122 3.2.1.3), multicast 224/4 (RFC 5771) or 240/4 with the broadcast address
    (RFC 1112 4)."""
    return not addr.is_unspecified and int(addr) < 0xE0000000


def parse_public_ip(text: str, what: str = "PublicIP") -> IPv4Address:
    """``parse_address``, refusing what ``can_be_public_ip`` refuses (ConfigError naming ``what``)."""
    addr = parse_address(text, what)
    if not can_be_public_ip(addr):
        raise ConfigError(f"{what} {text!r} is not a unicast address a host can have")
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
    """flannel's net-conf.json, validated, with defaults filled in as flannel fills them.

    Built by ``parse``; built directly, it still refuses (ConfigError) options
    of another type than ``backend_type`` and SubnetMin/Max outside the network.
    """

    network: IPv4Network
    subnet_len: int
    subnet_min: IPv4Address
    subnet_max: IPv4Address
    backend_type: str = DEFAULT_BACKEND
    backend: BackendOptions = field(default_factory=UdpOptions)
    """The ``Backend`` section, typed for ``backend_type`` (see tunproxy.backend_config)."""
    warnings: tuple[str, ...] = field(default=(), compare=False)
    """One line for each field or Backend option that is flannel's but has no effect here."""

    def __post_init__(self) -> None:
        kind = BACKEND_TYPES.get(self.backend_type)
        if kind is None or type(self.backend) is not kind:
            options = type(self.backend).__name__
            raise ConfigError(f"Backend options {options} do not belong to backend {self.backend_type!r}")
        if not (self.subnet_min in self.network and self.subnet_max in self.network):
            raise ConfigError(f"SubnetMin/SubnetMax are outside the Network {self.network}")

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
        kind = BACKEND_TYPES.get(backend_type) if isinstance(backend_type, str) else None
        backend = go_keys(backend, kind.KNOWN if kind else ())
        options = parse_backend(backend_type, {k: v for k, v in backend.items() if k != "Type"})
        warnings = _top_level_warnings(doc) + list(options.warnings)

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

    def with_backend(self, backend_type: str, said_by: str) -> NetworkConfig:
        """This config with another backend (``--backend``): that type's default options, since
        the ``Backend`` section was written for this one; its options' warnings give way to one
        line naming them and ``said_by`` (who asked: ``"--backend is host-gw"``). ConfigError
        for a type not in ``BACKEND_TYPES``."""
        if backend_type == self.backend_type:
            return self
        warnings = [w for w in self.warnings if w not in self.backend.warnings]
        if self.backend.raw:
            names = ", ".join(sorted(self.backend.raw))
            warnings.append(f"ignoring Backend {names}: written for {self.backend_type}, {said_by}")
        options = parse_backend(backend_type, {})
        return replace(self, backend_type=backend_type, backend=options, warnings=tuple(warnings))

    def to_json(self) -> str:
        """flannel's config JSON: Network, SubnetLen, SubnetMin, SubnetMax, Backend (options as given)."""
        backend = {"Type": self.backend_type, **self.backend.raw}
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

    The value of flannel's ``<prefix>/subnets/<subnet key>``. How long it
    lasts is the store's business (etcd's lease), not part of the value: a
    renewed lease is the same lease.
    """

    subnet: IPv4Network
    public_ip: IPv4Address
    backend_type: str = DEFAULT_BACKEND
    backend_data: Any = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.backend_type, str):
            raise LeaseError(f"lease {self.subnet}: BackendType must be a string, not {self.backend_type!r}")
        if not can_be_public_ip(self.public_ip):
            raise LeaseError(f"lease {self.subnet}: PublicIP {self.public_ip} is not a unicast address")

    @classmethod
    def parse(cls, key: str, value: bytes | str) -> Lease:
        """Parse flannel's lease key and value; LeaseError (one line) if either is malformed."""
        return cls.from_value(parse_subnet_key(key), value)

    @classmethod
    def from_value(cls, subnet: IPv4Network, value: bytes | str) -> Lease:
        """The lease of ``subnet`` (its key already parsed) from flannel's value,
        ``{"PublicIP": ..., "BackendType": ..., "BackendData": ...}``; LeaseError if malformed."""
        try:
            doc = json.loads(value)
        except ValueError:
            raise LeaseError(f"lease {subnet_key(subnet)} is not JSON: {value[:60]!r}") from None
        if not isinstance(doc, Mapping) or "PublicIP" not in doc:
            raise LeaseError(f"lease {subnet_key(subnet)} has no PublicIP: {str(doc)[:60]}")
        try:
            public_ip = parse_public_ip(doc["PublicIP"], "PublicIP")
        except ConfigError as e:
            raise LeaseError(f"lease {subnet_key(subnet)}: {e}") from None
        backend_type = doc.get("BackendType") or DEFAULT_BACKEND
        if not isinstance(backend_type, str):
            raise LeaseError(f"lease {subnet_key(subnet)}: BackendType must be a string")
        return cls(subnet, public_ip, backend_type, doc.get("BackendData"))

    def to_json(self) -> str:
        """flannel's lease value: PublicIP, BackendType and BackendData (left out when None), keys sorted."""
        doc: dict[str, Any] = {"PublicIP": str(self.public_ip), "BackendType": self.backend_type}
        if self.backend_data is not None:
            doc["BackendData"] = self.backend_data
        return json.dumps(doc, sort_keys=True)


@dataclass(frozen=True)
class LeaseAdded:
    """A lease appeared or changed (a watch PUT, or one row of a listing)."""

    lease: Lease

    @property
    def subnet(self) -> IPv4Network:
        """The lease's subnet, as ``LeaseRemoved`` has one."""
        return self.lease.subnet


@dataclass(frozen=True)
class LeaseRemoved:
    """A lease went away (expired, revoked or deleted): only its subnet is known."""

    subnet: IPv4Network


LeaseEvent = LeaseAdded | LeaseRemoved


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
