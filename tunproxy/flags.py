"""Flags and their environment variables: one converter per flag, one resolution rule.

Every flag can also come from the environment as ``TUNPROXY_<FLAG>`` or as
flannel's ``FLANNELD_<FLAG>`` (``--etcd-endpoints`` -> ``TUNPROXY_ETCD_ENDPOINTS``,
``FLANNELD_ETCD_ENDPOINTS``: flannel's rule, dashes stripped, upper case, dashes
to underscores). The command line wins over both; ``TUNPROXY_`` wins over
``FLANNELD_``. Values from either place go through the same converter (a CIDR
becomes an ``IPv4Network`` there, once), so a bad one is reported the same way,
naming the flag or the variable.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Mapping
from ipaddress import IPv4Address, IPv4Network
from typing import Any, NoReturn

from .backend_config import FEATURES
from .model import ConfigError, parse_address, parse_network, parse_public_ip

ENV_PREFIXES = ("TUNPROXY_", "FLANNELD_")  # the first set wins; the command line wins over both
MAX_IFNAME_LEN = 15  # the kernel's IFNAMSIZ (16) less the NUL


class UsageError(Exception):
    """Bad input found after argparse: printed as one line, exit 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line (``tunproxy: error: ...``), not usage plus error."""

    def error(self, message: str) -> NoReturn:
        """Raise UsageError(message) instead of printing the usage and exiting."""
        raise UsageError(message)


# --- values: every flag and every environment variable goes through one of these -----------------
#
# A converter takes the raw text and the name it came by (``--port`` or ``FLANNELD_PORT``) and
# returns the value, or raises ConfigError with one line naming that input.

Converter = Callable[[str, str], Any]


def text(raw: str, what: str) -> str:
    """The raw text, unchanged."""
    return raw


def integer(low: int, high: int, unit: str = "") -> Converter:
    """A converter to an int from ``low`` to ``high`` inclusive; ``unit`` follows the bound in the message."""

    def convert(raw: str, what: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ConfigError(f"{what} {raw!r} is not an integer") from None
        if not low <= value <= high:
            raise ConfigError(f"{what} {value} must be from {low} to {high}{unit}")
        return value

    return convert


def number(minimum: float, inclusive: bool, unit: str) -> Converter:
    """A float (no inf/nan) at or above (or strictly above) ``minimum``."""

    def convert(raw: str, what: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ConfigError(f"{what} {raw!r} is not a number of {unit}") from None
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            bound = f"at least {minimum:g}" if inclusive else f"more than {minimum:g}"
            raise ConfigError(f"{what} {raw!r} must be {bound} {unit}")
        return value

    return convert


def port_of(protocol: str) -> Converter:
    """A converter to a ``protocol`` port number, 1 to 65535."""

    def convert(raw: str, what: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ConfigError(f"{what} {raw!r} is not a {protocol} port (1-65535)") from None
        if not 0 < value < 65536:
            raise ConfigError(f"{what} {value} is not a {protocol} port (1-65535)")
        return value

    return convert


udp_port = port_of("UDP")
tcp_port = port_of("TCP")


# Go's strconv.ParseBool (what flannel's boolean flags accept), plus yes/no/on/off.
_TRUE = ("1", "t", "true", "yes", "y", "on")
_FALSE = ("0", "f", "false", "no", "n", "off")


def boolean(raw: str, what: str) -> bool:
    """Go's strconv.ParseBool spellings, as flannel's flags take (1 t true / 0 f false).

    Any case is accepted (Go takes only lower, Title and UPPER), and so are
    yes, y, on / no, n, off.
    """
    word = raw.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ConfigError(f"{what} {raw!r} is not true or false")


def choice(*choices: str) -> Converter:
    """A converter accepting exactly one of ``choices`` (case matters; spaces around are ignored)."""

    def convert(raw: str, what: str) -> str:
        if raw.strip() not in choices:
            raise ConfigError(f"{what} {raw!r} is not one of {', '.join(choices)}")
        return raw.strip()

    return convert


def cidr(raw: str, what: str) -> IPv4Network:
    """An IPv4 network with a prefix length and no host bits set (``parse_network``)."""
    return parse_network(raw, what)


def feature(raw: str, what: str) -> str:
    """The name of a data path feature (``backend_config.FEATURES``), for ``--without``/``--refuse``."""
    name = raw.strip()
    if name not in FEATURES:
        known = ", ".join(FEATURES) or "none"
        raise ConfigError(f"{what} {name!r} is not a data path feature (known: {known})")
    return name


def address(raw: str, what: str) -> IPv4Address:
    """An IPv4 address (``parse_address``)."""
    return parse_address(raw, what)


def public_ip(raw: str, what: str) -> IPv4Address:
    """An address peers can send to (``parse_public_ip``: no 0.0.0.0, multicast or 240/4)."""
    return parse_public_ip(raw, what)


def peer(raw: str, what: str) -> tuple[IPv4Network, IPv4Address]:
    """``PUBLICIP=SUBNET`` (``192.0.2.12=10.100.18.0/24``) -> (subnet, public ip)."""
    from .peers.static import parse_peer_flag

    return parse_peer_flag(raw.strip(), what)


def iface(raw: str, what: str) -> str:
    """A non-empty interface name or IPv4 address, stripped; ``find_underlay`` resolves it."""
    if not raw.strip():
        raise ConfigError(f"{what} is empty; give an interface name or an IPv4 address")
    return raw.strip()


def regex(raw: str, what: str) -> str:
    """A regular expression that compiles: Python's ``re`` syntax (flannel: Go's RE2; simple ones agree)."""
    try:
        re.compile(raw)
    except re.error as e:
        raise ConfigError(f"{what} {raw!r} is not a regular expression: {e}") from None
    return raw


def ifname(raw: str, what: str) -> str:
    """A device name: 1 to 15 bytes (IFNAMSIZ less the NUL), not ``.``/``..``, no ``/``, ``:`` or space.

    The rule of the kernel's ``dev_valid_name`` (net/core/dev.c).
    """
    too_long = len(raw.encode(errors="surrogateescape")) > MAX_IFNAME_LEN  # bytes, as the kernel counts
    if not raw or too_long or raw in (".", "..") or any(c in "/:" or c.isspace() for c in raw):
        rule = f"1-{MAX_IFNAME_LEN} characters, no '/', ':' or space"
        raise ConfigError(f"{what} {raw!r} is not a device name ({rule})")
    return raw


def endpoints(raw: str, what: str) -> str:
    """The text unchanged, once ``parse_endpoints`` accepts it."""
    from .etcd.endpoints import parse_endpoints

    try:
        parse_endpoints(raw)
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from None
    return raw


def kube(raw: str, what: str) -> bool:
    """``--kube-subnet-mgr``: false is accepted and ignored; true is a ConfigError (no Kubernetes mode)."""
    if boolean(raw, what):
        raise ConfigError(
            f"{what}: tunproxy has no Kubernetes subnet manager; "
            "use --etcd-endpoints, or --network/--subnet with static peers"
        )
    return False


def option(
    group: Any,
    *flags: str,
    convert: Converter = text,
    split: bool = True,
    **kwargs: Any,
) -> argparse.Action:
    """Add a flag whose value (from the command line or the environment) goes through ``convert``.

    A boolean flag (``default=False`` with no ``nargs``) also takes Go's ``--flag=false``, as
    flannel's do. ``split``: a repeatable flag read from one environment variable is split at
    commas and spaces (a regex is not).
    """
    if kwargs.get("default") is False and "nargs" not in kwargs and "action" not in kwargs:
        kwargs.update(nargs="?", const="true", metavar="BOOL")
        convert = boolean if convert is text else convert
    action: argparse.Action = group.add_argument(*flags, **kwargs)
    action.convert = convert  # type: ignore[attr-defined]
    action.split = split  # type: ignore[attr-defined]
    action.real_default = action.default  # type: ignore[attr-defined]
    action.default = argparse.SUPPRESS  # absent from the namespace unless given on the command line
    return action


# flannel flags with no effect here: accepted (so a flannel command line runs) with one warning.
FLANNEL_IGNORED = {
    "--iptables-resync": "tunproxy writes no iptables rules",
    "--iptables-forward-rules": "tunproxy writes no iptables rules",
    "--public-ipv6": "tunproxy carries IPv4 only",
    "--persistent-mac": "the VtepMAC is always derived from the public IP, so it is always persistent",
    "--set-node-network-unavailable": "tunproxy has no Kubernetes subnet manager",
    "--kube-api-url": "tunproxy has no Kubernetes subnet manager",
    "--kube-annotation-prefix": "tunproxy has no Kubernetes subnet manager",
    "--kubeconfig-file": "tunproxy has no Kubernetes subnet manager",
    "--use-multi-cluster-cidr": "tunproxy has no Kubernetes subnet manager",
}
IGNORED_BOOLEANS = (
    "--iptables-forward-rules",
    "--persistent-mac",
    "--set-node-network-unavailable",
    "--use-multi-cluster-cidr",
)


def env_names(action: argparse.Action) -> list[str]:
    """flannel's rule for every flag name: strip the dashes, upper-case, dashes to underscores, prefix."""
    return [
        prefix + flag.lstrip("-").upper().replace("-", "_")
        for prefix in ENV_PREFIXES
        for flag in action.option_strings
        if flag.startswith("--")
    ]


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices.values())
    return []


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    return next(sub for sub in _subparsers(parser) if sub.prog.endswith(" " + command))


def resolve(
    parser: argparse.ArgumentParser, args: argparse.Namespace, environ: Mapping[str, str]
) -> list[str]:
    """Fill every option: the command line, else TUNPROXY_<FLAG>, else FLANNELD_<FLAG>, else the default.

    Every value goes through its flag's converter; ``args.sources`` maps each
    option's dest to the flag or variable it came from, for messages. An empty
    variable counts as unset (as in flannel). Returns warnings to log: flannel
    flags that have no effect here, and TUNPROXY_ variables that name no flag.
    Raises ConfigError naming the flag or variable of the first bad value.
    """
    sub = _subparser(parser, args.command)
    sources: dict[str, str] = {}
    warnings: list[str] = []
    known: set[str] = set()
    for action in sub._actions:
        if not action.option_strings or action.dest in ("help", "version"):
            continue
        names = env_names(action)
        known.update(names)
        convert: Converter = action.convert  # type: ignore[attr-defined]
        repeated = isinstance(action, argparse._AppendAction)
        flag = action.option_strings[0]
        if hasattr(args, action.dest):
            raw, origin = getattr(args, action.dest), flag
            items = raw if repeated else [raw]
        else:
            origin = next((n for n in names if environ.get(n, "").strip()), "")
            if not origin:
                setattr(args, action.dest, action.real_default)  # type: ignore[attr-defined]
                continue
            raw = environ[origin]
            split = repeated and action.split  # type: ignore[attr-defined]
            items = raw.replace(",", " ").split() if split else [raw]
        values = [convert(item, origin) for item in items]
        setattr(args, action.dest, values if repeated else values[0])
        sources[action.dest] = origin
        if flag in FLANNEL_IGNORED:
            warnings.append(f"ignoring {origin}: {FLANNEL_IGNORED[flag]}")
    for other in _subparsers(parser):  # a variable for another command is not a typo
        known.update(n for action in other._actions if action.option_strings for n in env_names(action))
    for name in sorted(environ):
        if name.startswith(ENV_PREFIXES[0]) and name not in known and environ[name].strip():
            warnings.append(f"ignoring {name}: no tunproxy flag is called that")
    args.sources = sources
    return warnings


def source(args: argparse.Namespace, dest: str) -> str:
    """The flag or environment variable a value came from (the flag if it was the default)."""
    return str(getattr(args, "sources", {}).get(dest) or "--" + dest.replace("_", "-"))
