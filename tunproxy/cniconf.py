"""The CNI plugin's pure core: flannel's network config, subnet.env and the delegate config.

How flannel's CNI plugin works (flannel-io/cni-plugin, flannel.go and
flannel_linux.go), which tunproxy's plugin follows key for key:

- The runtime hands the plugin a network config (``type: flannel``) whose own
  keys are ``subnetFile`` (default ``/run/flannel/subnet.env``), ``dataDir``
  (default ``/var/lib/cni/flannel``), ``delegate`` (a partial config for the
  plugin that does the work) and optionally ``ipam`` and ``runtimeConfig``.
- On ADD it reads the daemon's subnet.env and fills the delegate in: ``name``
  from the network, ``type`` ``bridge`` unless given, ``ipMasq`` = NOT
  ``FLANNEL_IPMASQ`` (if the daemon does not masquerade, the bridge should),
  ``mtu`` = ``FLANNEL_MTU``, and for a bridge ``isGateway`` true. A key the user
  set in ``delegate`` is never overwritten. IPAM is ``host-local`` unless given,
  with ``ranges`` = ``[[{"subnet": <this host's subnet>}]]`` and ``routes`` =
  the user's routes plus one to each ``FLANNEL_NETWORK`` (tunproxy names its
  gateway, the subnet's first address, which the bridge uses anyway: see
  ``_network_routes``).
- It stores the delegate config under ``dataDir/<container ID>`` before
  delegating, so DEL delegates exactly what ADD did, even after subnet.env
  changed or vanished. DEL without a stored config succeeds (nothing to undo).

Everything here is pure: bytes and text in, values out, ``CNIError`` on bad
input. The exec and file I/O live in ``tunproxy.cni``.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"  # flannel's; tunproxy run writes /run/tunproxy/subnet.env
DEFAULT_DATA_DIR = "/var/lib/cni/flannel"
DEFAULT_BRIDGE = "cni0"  # the bridge plugin's own default, written out so the stored config says it

# The versions the Debian reference plugins (1.1.x) speak; we pass the config's version to them.
SUPPORTED_VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0")
CURRENT_VERSION = "1.0.0"

# The CNI spec's well-known error codes (SPEC.md, "Well-known Error Codes"); 999 is
# libcni's types.ErrInternal, what Go plugins (flannel's among them) return for other errors.
INCOMPATIBLE_CNI_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT_VARIABLES = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_NETWORK_CONFIG = 7
TRY_AGAIN_LATER = 11
INTERNAL = 999

# libcni's skel checks (pkg/utils: ValidateContainerID, ValidateInterfaceName).
_CONTAINER_ID = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")
_REQUIRED = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
}


class CNIError(Exception):
    """A CNI error result: ``code`` (the spec's well-known codes, or 999), ``msg``, ``details``.

    Printed on stdout as the spec's error object with a non-zero exit.
    """

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str = CURRENT_VERSION) -> dict[str, Any]:
        """The spec's error object: ``{"cniVersion", "code", "msg"[, "details"]}``."""
        obj: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            obj["details"] = self.details
        return obj


def version_tuple(version: str) -> tuple[int, ...]:
    """``"0.4.0"`` -> ``(0, 4, 0)``; raises CNIError(1) on anything else."""
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        raise CNIError(INCOMPATIBLE_CNI_VERSION, f"cniVersion {version!r} is not a version") from None


def version_info() -> dict[str, Any]:
    """The VERSION result: ``{"cniVersion": "1.0.0", "supportedVersions": [...]}``."""
    return {"cniVersion": CURRENT_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}


@dataclass(frozen=True)
class Invocation:
    """The runtime's environment for one call (CNI spec, "Parameters")."""

    command: str
    container_id: str
    netns: str
    ifname: str
    path: tuple[str, ...]


def parse_environment(environ: Mapping[str, str]) -> Invocation:
    """Validate ``CNI_*`` for ADD, CHECK or DEL, as libcni's skel does.

    Raises CNIError(4) naming the missing or invalid variables.
    """
    command = environ.get("CNI_COMMAND", "")
    if command not in _REQUIRED:
        raise CNIError(INVALID_ENVIRONMENT_VARIABLES, f"unknown CNI_COMMAND: {command}")
    missing = [name for name in _REQUIRED[command] if not environ.get(name)]
    if missing:
        raise CNIError(INVALID_ENVIRONMENT_VARIABLES, f"required env variables [{','.join(missing)}] missing")
    container_id = environ["CNI_CONTAINERID"]
    if not _CONTAINER_ID.match(container_id):
        # It names a file in dataDir: no path separators, no dot-dot.
        raise CNIError(INVALID_ENVIRONMENT_VARIABLES, "invalid characters in CNI_CONTAINERID", container_id)
    ifname = environ["CNI_IFNAME"]
    if len(ifname) > 15 or ifname in (".", "..") or re.search(r"[/:\s]", ifname):
        raise CNIError(INVALID_ENVIRONMENT_VARIABLES, f"invalid CNI_IFNAME {ifname!r}")
    path = tuple(p for p in environ["CNI_PATH"].split(":") if p)
    return Invocation(command, container_id, environ.get("CNI_NETNS", ""), ifname, path)


@dataclass(frozen=True)
class NetConf:
    """Our network config (flannel's NetConf). Dict fields are copies; treat them as read-only."""

    name: str
    cni_version: str
    subnet_file: Path
    data_dir: Path
    delegate: dict[str, Any] = field(default_factory=dict)
    ipam: dict[str, Any] | None = None
    runtime_config: dict[str, Any] | None = None
    prev_result: dict[str, Any] | None = None


def _optional(conf: Mapping[str, Any], key: str, kind: type, what: str) -> Any:
    value = conf.get(key)
    if value is not None and not isinstance(value, kind):
        raise CNIError(INVALID_NETWORK_CONFIG, f"network config: {key!r} must be {what}, not {value!r}")
    return value


def load_netconf(data: bytes) -> NetConf:
    """Parse the network config from stdin; defaults as flannel's (subnetFile, dataDir).

    Raises CNIError(6) if it is not a JSON object, (1) for an unsupported
    ``cniVersion``, (7) for a key of the wrong type or a missing ``name``.
    """
    try:
        conf = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CNIError(DECODING_FAILURE, f"network config on stdin is not JSON: {e}") from None
    if not isinstance(conf, dict):
        raise CNIError(DECODING_FAILURE, "network config on stdin is not a JSON object")
    version = _optional(conf, "cniVersion", str, "a string") or "0.1.0"  # libcni: none means 0.1.0
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(
            INCOMPATIBLE_CNI_VERSION,
            "incompatible CNI versions",
            f"config is {version!r}, plugin supports {list(SUPPORTED_VERSIONS)}",
        )
    name = _optional(conf, "name", str, "a string")
    if not name:
        raise CNIError(INVALID_NETWORK_CONFIG, "network config has no 'name'")
    return NetConf(
        name=name,
        cni_version=version,
        subnet_file=Path(_optional(conf, "subnetFile", str, "a path") or DEFAULT_SUBNET_FILE),
        data_dir=Path(_optional(conf, "dataDir", str, "a path") or DEFAULT_DATA_DIR),
        delegate=dict(_optional(conf, "delegate", dict, "an object") or {}),
        ipam=_optional(conf, "ipam", dict, "an object"),
        runtime_config=_optional(conf, "runtimeConfig", dict, "an object"),
        prev_result=_optional(conf, "prevResult", dict, "an object"),
    )


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class SubnetEnv:
    """What flannel's subnet.env says about this host.

    ``networks``: the overlay range(s) (``FLANNEL_NETWORK``, comma-separated in
    newer flannel); ``subnet``: this host's subnet, masked (``FLANNEL_SUBNET``
    holds its first host address, ``10.100.5.1/24`` -> ``10.100.5.0/24``);
    ``mtu`` in bytes; ``ipmasq``: the daemon masquerades pod traffic itself.
    The IPv6 keys are read as flannel reads them.
    """

    networks: tuple[IPNetwork, ...]
    subnet: IPNetwork | None
    ipv6_networks: tuple[IPNetwork, ...]
    ipv6_subnet: IPNetwork | None
    mtu: int
    ipmasq: bool


def parse_subnet_env(text: str, source: str = "subnet.env") -> SubnetEnv:
    """Parse subnet.env as flannel's loadFlannelSubnetEnv does.

    Unknown keys and lines without ``=`` are ignored; ``FLANNEL_IPMASQ`` is
    true only when it is exactly ``true``. Raises CNIError(999) naming the file
    and the key for a value that does not parse, or for missing keys (a
    network, a subnet, ``FLANNEL_MTU`` and ``FLANNEL_IPMASQ`` are required).
    """
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()

    def nets(key: str) -> tuple[IPNetwork, ...]:
        if key not in values:
            return ()
        try:
            return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in values[key].split(","))
        except ValueError:
            raise CNIError(INTERNAL, f"{source}: {key}={values[key]} is not a CIDR") from None

    networks, ipv6_networks = nets("FLANNEL_NETWORK"), nets("FLANNEL_IPV6_NETWORK")
    subnets, ipv6_subnets = nets("FLANNEL_SUBNET"), nets("FLANNEL_IPV6_SUBNET")
    missing = []
    if not networks and not ipv6_networks:
        missing += ["FLANNEL_NETWORK", "FLANNEL_IPV6_NETWORK"]
    if not subnets and not ipv6_subnets:
        missing += ["FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"]
    for key in ("FLANNEL_MTU", "FLANNEL_IPMASQ"):
        if key not in values:
            missing.append(key)
    if missing:
        raise CNIError(INTERNAL, f"{source} is missing {', '.join(missing)}")
    try:
        mtu = int(values["FLANNEL_MTU"])
        if not 68 <= mtu <= 65535:
            raise ValueError
    except ValueError:
        raise CNIError(INTERNAL, f"{source}: FLANNEL_MTU={values['FLANNEL_MTU']} is not an MTU") from None
    return SubnetEnv(
        networks=networks,
        subnet=subnets[0] if subnets else None,
        ipv6_networks=ipv6_networks,
        ipv6_subnet=ipv6_subnets[0] if ipv6_subnets else None,
        mtu=mtu,
        ipmasq=values["FLANNEL_IPMASQ"] == "true",
    )


def _delegate_ipam(conf: NetConf, env: SubnetEnv) -> dict[str, Any]:
    ipam = dict(conf.ipam or {})
    ipam.setdefault("type", "host-local")
    ipam["ranges"] = [[{"subnet": str(sn)}] for sn in (env.subnet, env.ipv6_subnet) if sn is not None]
    routes = ipam.get("routes", [])
    if not isinstance(routes, list) or not all(isinstance(r, dict) and "dst" in r for r in routes):
        raise CNIError(
            INVALID_NETWORK_CONFIG, f"network config: ipam.routes must be a list of routes, not {routes!r}"
        )
    ipam["routes"] = [
        *routes,
        *_network_routes(env.networks, env.subnet),
        *_network_routes(env.ipv6_networks, env.ipv6_subnet),
    ]
    return ipam


def _network_routes(networks: tuple[IPNetwork, ...], subnet: IPNetwork | None) -> list[dict[str, str]]:
    # flannel writes {"dst": network} without "gw"; the bridge then routes it via the range's
    # gateway anyway (host-local's default: the subnet's first address). Naming that gateway
    # gives the same kernel route, but a result that says so, which bridge's CHECK compares
    # with the pod's routing table (without it CHECK reports the route missing).
    gw = {"gw": str(subnet.network_address + 1)} if subnet is not None else {}
    return [{"dst": str(nw), **gw} for nw in networks]


def delegate_config(conf: NetConf, env: SubnetEnv) -> dict[str, Any]:
    """The config handed to the delegate plugin on ADD (flannel's doCmdAdd; see the module doc).

    Raises CNIError(7) for a ``delegate`` that sets ``name`` or ``ipam`` (both
    are the plugin's to set) or whose ``type`` is not a string.
    """
    delegate = dict(conf.delegate)
    if "type" in delegate and not isinstance(delegate["type"], str):
        raise CNIError(
            INVALID_NETWORK_CONFIG, "'delegate' dictionary, if present, must have (string) 'type' field"
        )
    for key in ("name", "ipam"):
        if key in delegate:
            raise CNIError(
                INVALID_NETWORK_CONFIG,
                f"'delegate' dictionary must not have '{key}' field, it is set by the plugin",
            )
    delegate["name"] = conf.name
    delegate["cniVersion"] = conf.cni_version
    delegate.setdefault("type", "bridge")
    delegate.setdefault("ipMasq", not env.ipmasq)  # the daemon does not masquerade: the bridge must
    delegate.setdefault("mtu", env.mtu)
    if delegate["type"] == "bridge":
        delegate.setdefault("isGateway", True)
        delegate.setdefault("bridge", DEFAULT_BRIDGE)
    if conf.runtime_config is not None:
        delegate["runtimeConfig"] = conf.runtime_config
    delegate["ipam"] = _delegate_ipam(conf, env)
    if conf.prev_result is not None:
        delegate["prevResult"] = conf.prev_result
    return delegate


def stored_config(delegate: Mapping[str, Any]) -> dict[str, Any]:
    """What ADD keeps for DEL and CHECK: the delegate config without the call's ``prevResult``."""
    return {k: v for k, v in delegate.items() if k != "prevResult"}


def replay_config(stored: Mapping[str, Any], conf: NetConf) -> dict[str, Any]:
    """The config for DEL or CHECK: the stored one, with this call's ``prevResult`` (spec: CHECK needs it)."""
    config = stored_config(stored)
    if conf.prev_result is not None:
        config["prevResult"] = conf.prev_result
    return config


def parse_stored(data: bytes, source: str) -> dict[str, Any]:
    """A stored delegate config; raises CNIError(6) if it is not an object with a string ``type``."""
    try:
        stored = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CNIError(DECODING_FAILURE, f"{source} is not JSON: {e}") from None
    if not isinstance(stored, dict) or not isinstance(stored.get("type"), str):
        raise CNIError(DECODING_FAILURE, f"{source} is not a delegate network config")
    return stored


def check_subnet(stored: Mapping[str, Any], env: SubnetEnv) -> None:
    """CHECK's own test: the stored IPAM ranges are still this host's subnet(s) in subnet.env.

    A host that lost its lease and got another subnet no longer receives
    traffic for the pod's address. Raises CNIError(999) naming both subnets.
    """
    ranges = stored.get("ipam", {}).get("ranges") if isinstance(stored.get("ipam"), dict) else None
    now = [[{"subnet": str(sn)}] for sn in (env.subnet, env.ipv6_subnet) if sn is not None]
    if ranges is not None and ranges != now:
        before = ", ".join(str(r[0].get("subnet")) for r in ranges if r and isinstance(r[0], dict))
        after = ", ".join(r[0]["subnet"] for r in now)
        raise CNIError(
            INTERNAL,
            f"the pod's addresses are from {before}, but this host's subnet is now {after} "
            "(subnet.env changed since ADD): recreate the pod",
        )


def plugin_name(value: Any, what: str) -> str:
    """A plugin ``type`` usable as a file name in CNI_PATH; raises CNIError(7) otherwise."""
    if not isinstance(value, str) or not value or "/" in value or value in (".", ".."):
        raise CNIError(INVALID_NETWORK_CONFIG, f"{what} {value!r} is not a plugin name")
    return value
