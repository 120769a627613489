"""The command line: ``tunproxy run``, ``status``, ``drops`` and ``leases``.

Every flag can also come from the environment as ``TUNPROXY_<FLAG>`` or as
flannel's ``FLANNELD_<FLAG>`` (``--etcd-endpoints`` -> ``TUNPROXY_ETCD_ENDPOINTS``,
``FLANNELD_ETCD_ENDPOINTS``: flannel's rule, dashes stripped, upper case, dashes
to underscores). The command line wins over both; ``TUNPROXY_`` wins over
``FLANNELD_``. Values from either place go through the same converter, so a
bad one is reported the same way, naming the flag or the variable. Anything
wrong with the input ends in one line on stderr and a non-zero exit, never a
traceback; so does an unexpected exception (the traceback is logged at debug).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, NoReturn

from . import __version__, cli_observe
from .backend_config import (
    BACKEND_TYPES,
    BATCH_DEFAULT,
    BATCH_MAX,
    DEFAULT_TUN,
    DROP_RING_DEFAULT,
    DROP_RING_MAX,
    FEATURES,
    WORKERS_MAX,
    UdpFlags,
    parse_backend,
)
from .control import NoDaemon
from .fastpath import MAX_ROUTES
from .model import ConfigError, LeaseError, NetworkConfig, parse_address, parse_network
from .supervise import TaskDied

ENV_PREFIXES = ("TUNPROXY_", "FLANNELD_")  # the first set wins; the command line wins over both
DEFAULT_SUBNET_FILE = "/run/tunproxy/subnet.env"
IFNAMSIZ = 15
log = logging.getLogger("tunproxy")


class UsageError(Exception):
    """Bad input found after argparse: printed as one line, exit 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line (``tunproxy: error: ...``), not usage plus error."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


# --- values: every flag and every environment variable goes through one of these -----------------
#
# A converter takes the raw text and the name it came by (``--port`` or ``FLANNELD_PORT``) and
# returns the value, or raises ConfigError with one line naming that input.

Converter = Callable[[str, str], Any]


def _text(raw: str, what: str) -> str:
    return raw


def _integer(low: int, high: int, unit: str = "") -> Converter:
    def convert(raw: str, what: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ConfigError(f"{what} {raw!r} is not an integer") from None
        if not low <= value <= high:
            raise ConfigError(f"{what} {value} must be from {low} to {high}{unit}")
        return value

    return convert


def _number(minimum: float, inclusive: bool, unit: str) -> Converter:
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


def _port_of(protocol: str) -> Converter:
    def convert(raw: str, what: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ConfigError(f"{what} {raw!r} is not a {protocol} port (1-65535)") from None
        if not 0 < value < 65536:
            raise ConfigError(f"{what} {value} is not a {protocol} port (1-65535)")
        return value

    return convert


_port = _port_of("UDP")
_tcp_port = _port_of("TCP")


# Go's strconv.ParseBool (what flannel's boolean flags accept), plus yes/no/on/off.
_TRUE = ("1", "t", "true", "yes", "y", "on")
_FALSE = ("0", "f", "false", "no", "n", "off")


def _boolean(raw: str, what: str) -> bool:
    word = raw.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ConfigError(f"{what} {raw!r} is not true or false")


def _choice(*choices: str) -> Converter:
    def convert(raw: str, what: str) -> str:
        if raw not in choices:
            raise ConfigError(f"{what} {raw!r} is not one of {', '.join(choices)}")
        return raw

    return convert


def _cidr(raw: str, what: str) -> IPv4Network:
    return parse_network(raw, what)


def _feature(raw: str, what: str) -> str:
    name = raw.strip()
    if name not in FEATURES:
        known = ", ".join(FEATURES) or "none"
        raise ConfigError(f"{what} {name!r} is not a data path feature (known: {known})")
    return name


def _address(raw: str, what: str) -> IPv4Address:
    return parse_address(raw, what)


def _peer(raw: str, what: str) -> tuple[IPv4Network, IPv4Address]:
    from .peers.static import parse_peer_flag

    return parse_peer_flag(raw.strip(), what)


def _iface(raw: str, what: str) -> str:
    if not raw.strip():
        raise ConfigError(f"{what} is empty; give an interface name or an IPv4 address")
    return raw.strip()


def _regex(raw: str, what: str) -> str:
    try:
        re.compile(raw)
    except re.error as e:
        raise ConfigError(f"{what} {raw!r} is not a regular expression: {e}") from None
    return raw


def _ifname(raw: str, what: str) -> str:
    if not raw or len(raw) > IFNAMSIZ or raw in (".", "..") or any(c in raw for c in "/:" + " \t\n"):
        rule = f"1-{IFNAMSIZ} characters, no '/', ':' or space"
        raise ConfigError(f"{what} {raw!r} is not a device name ({rule})")
    return raw


def _endpoints(raw: str, what: str) -> str:
    from .peers.etcd_logic import parse_endpoints

    try:
        parse_endpoints(raw)
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from None
    return raw


def _kube(raw: str, what: str) -> bool:
    if _boolean(raw, what):
        raise ConfigError(
            f"{what}: tunproxy has no Kubernetes subnet manager; "
            "use --etcd-endpoints, or --network/--subnet with static peers"
        )
    return False


def option(
    group: Any,
    *flags: str,
    convert: Converter = _text,
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
        convert = _boolean if convert is _text else convert
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
_IGNORED_BOOLEANS = (
    "--iptables-forward-rules",
    "--persistent-mac",
    "--set-node-network-unavailable",
    "--use-multi-cluster-cidr",
)


def build_parser() -> ArgumentParser:
    """The parser. Values are converted by ``resolve``, which also reads the environment."""
    parser = ArgumentParser(prog="tunproxy", description="A flannel-style IPv4 overlay.")
    parser.add_argument("--version", action="version", version=f"tunproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="join the overlay and forward traffic until SIGINT/SIGTERM",
        description="Join the overlay and forward traffic until SIGINT/SIGTERM. "
        "Peers come from --etcd-endpoints if given, else from --peer/--peers-file "
        "(SIGHUP re-reads the peers file). Every flag can also be set as TUNPROXY_<FLAG> "
        "or flannel's FLANNELD_<FLAG>.",
    )
    run.add_argument("--version", action="version", version=f"tunproxy {__version__}")  # as flanneld's
    net = run.add_argument_group("network (static mode)")
    option(net, "--network", convert=_cidr, help="the overlay range, e.g. 10.100.0.0/16")
    option(net, "--subnet", convert=_cidr, help="this host's subnet, e.g. 10.100.5.0/24")
    option(
        net,
        "--net-config",
        "--net-config-path",
        metavar="FILE",
        help="flannel net-conf.json instead of --network",
    )
    option(
        net,
        "--backend",
        convert=_choice(*BACKEND_TYPES),
        metavar="{" + ",".join(BACKEND_TYPES) + "}",
        help="backend type (default: the net config's, else udp)",
    )
    option(
        net,
        "--peer",
        action="append",
        default=[],
        convert=_peer,
        metavar="PUBLIC_IP=SUBNET",
        help="a peer host and its subnet; repeat for more",
    )
    option(
        net,
        "--peers-file",
        metavar="FILE",
        help='JSON list of {"PublicIP": ..., "Subnet": ...}; re-read on SIGHUP',
    )

    host = run.add_argument_group("this host (the underlay interface: flannel's rules and precedence)")
    option(
        host,
        "--iface",
        action="append",
        default=[],
        convert=_iface,
        metavar="NAME_OR_IP",
        help="interface to use, by name or by one of its IPv4 addresses; repeat to try each in order",
    )
    option(
        host,
        "--iface-regex",
        action="append",
        default=[],
        convert=_regex,
        split=False,
        metavar="REGEX",
        help="searched in every interface's addresses, then names; repeatable; tried after --iface",
    )
    option(
        host,
        "--iface-can-reach",
        convert=_address,
        metavar="IP",
        help="the interface the kernel routes this address through (ip route get); tried last",
    )
    option(host, "--public-ip", convert=_address, help="address peers send to (default: the interface's)")
    option(host, "--subnet-file", default=DEFAULT_SUBNET_FILE, help="where to write subnet.env ('' for none)")
    option(
        host,
        "--ip-masq",
        default=False,
        help="masquerade traffic from the overlay to outside it (nftables table ip tunproxy); "
        "also FLANNEL_IPMASQ=true in subnet.env",
    )
    cli_observe.add_run_flags(run)

    udp = run.add_argument_group("udp backend")
    option(udp, "--port", convert=_port, help="UDP port (default: Backend.Port, else 8285)")
    option(
        udp,
        "--batch",
        convert=_integer(1, BATCH_MAX),
        default=BATCH_DEFAULT,
        help=f"packets per system call (default {BATCH_DEFAULT})",
    )
    option(
        udp, "--tun-name", convert=_ifname, default=DEFAULT_TUN, help=f"TUN device (default {DEFAULT_TUN})"
    )
    option(
        udp,
        "--max-routes",
        convert=_integer(0, MAX_ROUTES),
        default=0,
        help="most peer routes the fast path holds (0, the default: every SubnetLen subnet of the "
        "network, at least 4096); leases past it are logged and added when room frees",
    )
    option(
        udp,
        "--drop-ring",
        convert=_integer(0, DROP_RING_MAX),
        default=DROP_RING_DEFAULT,
        help=f"dropped packets kept for tunproxy drops (default {DROP_RING_DEFAULT}; 0: none)",
    )
    option(
        udp,
        "--no-offload",
        default=False,
        help="one packet per TUN read/write: no TSO on the TUN, no UDP GSO/GRO (same wire format)",
    )
    option(
        udp,
        "--workers",
        convert=_integer(1, WORKERS_MAX),
        metavar="N",
        help="threads moving packets, each with its own TUN queue and UDP socket (SO_REUSEPORT); "
        "1 is the single event-loop thread (default: one per 2 CPUs, at most 4)",
    )
    option(
        udp,
        "--without",
        action="append",
        default=[],
        convert=_feature,
        metavar="FEATURE",
        help="turn one of the data path's speed-ups off, to measure what it buys; repeatable "
        f"({', '.join(FEATURES) or 'none yet'})",
    )
    option(
        udp,
        "--refuse",
        action="append",
        default=[],
        convert=_feature,
        metavar="FEATURE",
        help="for tests: act as if the kernel refused FEATURE, so its fallback runs",
    )
    option(
        udp,
        "--allow-any-source",
        default=False,
        help="accept a peer's packets whatever their inner source (default: only from the peer's "
        "subnets, others are dropped and counted as spoofed)",
    )

    _add_etcd_flags(run)
    store = run.add_argument_group("leases")
    option(
        store,
        "--subnet-lease-ttl",
        convert=_number(0, False, "minutes"),
        default=24 * 60,
        help="lease lifetime in minutes (default 1440 = 24 h)",
    )
    option(
        store,
        "--subnet-lease-renew-margin",
        convert=_number(0, False, "minutes"),
        default=60,
        help="renew this many minutes before the lease expires (default 60)",
    )

    misc = run.add_argument_group("logging")
    option(
        misc,
        "--stats-interval",
        convert=_number(0, True, "seconds"),
        default=60.0,
        help="seconds between counter summaries in the log (0: only at exit)",
    )
    option(
        misc,
        "--check-interval",
        convert=_number(0, False, "seconds"),
        default=10.0,
        help="seconds between checks that restore routes/devices removed behind our back",
    )
    _add_log_level(misc)

    ignored = run.add_argument_group("flannel flags accepted and ignored (one warning each)")
    option(ignored, "--kube-subnet-mgr", default=False, convert=_kube, help="refused: no Kubernetes mode")
    for flag in FLANNEL_IGNORED:
        if flag in _IGNORED_BOOLEANS:
            option(ignored, flag, default=False, help=argparse.SUPPRESS)
        else:
            option(ignored, flag, help=argparse.SUPPRESS)

    leases = sub.add_parser("leases", help="list the leases in etcd")
    _add_etcd_flags(leases)
    option(leases, "--json", default=False, help="print JSON instead of a table")
    _add_log_level(leases)
    for asking in cli_observe.add_commands(sub):
        _add_log_level(asking)
    return parser


def _add_log_level(group: Any) -> None:
    option(
        group,
        "--log-level",
        convert=_choice("debug", "info", "warning", "error"),
        default="info",
        metavar="{debug,info,warning,error}",
        help="debug also prints the traceback of an unexpected error",
    )


def _add_etcd_flags(parser: argparse.ArgumentParser) -> None:
    etcd = parser.add_argument_group("etcd")
    option(etcd, "--etcd-endpoints", convert=_endpoints, help="comma-separated, e.g. http://192.0.2.100:2379")
    option(etcd, "--etcd-prefix", default="/coreos.com/network")
    option(etcd, "--etcd-cafile")
    option(etcd, "--etcd-certfile")
    option(etcd, "--etcd-keyfile")
    option(etcd, "--etcd-username")
    option(etcd, "--etcd-password")


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


def parse(argv: list[str] | None, environ: Mapping[str, str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse the command line and the environment; UsageError/ConfigError for bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return args, resolve(parser, args, environ)


def static_network_config(args: argparse.Namespace) -> NetworkConfig:
    """The network config in static mode: from --net-config, else --network (and --subnet's length)."""
    if args.net_config:
        what = source(args, "net_config")
        try:
            text = Path(args.net_config).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read {what} {args.net_config}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{what} {args.net_config} is not UTF-8 text") from None
        try:
            config = NetworkConfig.parse(text)
        except ConfigError as e:
            raise ConfigError(f"{what} {args.net_config}: {e}") from None
        if args.network and args.network != config.network:
            raise ConfigError(f"{source(args, 'network')} {args.network} disagrees with {args.net_config}")
    elif args.network:
        doc: dict[str, Any] = {"Network": str(args.network)}
        if args.subnet:
            doc["SubnetLen"] = args.subnet.prefixlen
        try:
            config = NetworkConfig.parse(doc)
        except ConfigError as e:
            raise ConfigError(f"{source(args, 'network')} {args.network}: {e}") from None
    else:
        raise UsageError("give --network (or --net-config), or --etcd-endpoints")
    if args.backend and args.backend != config.backend_type:
        # The Backend options were written for the config's type; another type gets none of them.
        warnings = [w for w in config.warnings if not w.startswith("ignoring Backend.")]
        if config.backend.raw:
            names = ", ".join(sorted(config.backend.raw))
            warnings.append(
                f"ignoring Backend {names}: written for {config.backend_type}, "
                f"{source(args, 'backend')} is {args.backend}"
            )
        config = NetworkConfig(
            config.network,
            config.subnet_len,
            config.subnet_min,
            config.subnet_max,
            args.backend,
            parse_backend(args.backend, {}),
            tuple(warnings),
        )
    return config


def check_etcd_flags(args: argparse.Namespace) -> None:
    """The etcd flags' mistakes, each naming the flag or variable it came from, before any I/O."""
    cert, key = source(args, "etcd_certfile"), source(args, "etcd_keyfile")
    if bool(args.etcd_certfile) != bool(args.etcd_keyfile):
        raise ConfigError(f"{cert} and {key} go together")
    if bool(args.etcd_username) != bool(args.etcd_password):
        raise ConfigError(f"{source(args, 'etcd_username')} and {source(args, 'etcd_password')} go together")
    for dest in ("etcd_cafile", "etcd_certfile", "etcd_keyfile"):
        path = getattr(args, dest)
        if path:
            try:
                Path(path).read_bytes()
            except OSError as e:
                raise ConfigError(f"cannot read {source(args, dest)} {path}: {e.strerror}") from None
    check_tls_files(args)


def check_tls_files(args: argparse.Namespace) -> None:
    """PEM files that TLS cannot use are one line naming the flag, not gRPC's C-core log lines later."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if args.etcd_cafile:
        try:
            context.load_verify_locations(cafile=args.etcd_cafile)
        except (ssl.SSLError, ValueError):
            what = source(args, "etcd_cafile")
            raise ConfigError(f"{what} {args.etcd_cafile} holds no PEM certificate") from None
    if args.etcd_certfile and args.etcd_keyfile:
        try:
            context.load_cert_chain(args.etcd_certfile, args.etcd_keyfile)
        except (ssl.SSLError, ValueError):
            cert, key = source(args, "etcd_certfile"), source(args, "etcd_keyfile")
            raise ConfigError(
                f"{cert} {args.etcd_certfile} and {key} {args.etcd_keyfile} are not a PEM certificate "
                "and its private key"
            ) from None


def make_registry(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    if args.etcd_endpoints:
        from .peers.etcd import EtcdRegistry, etcd_settings

        check_etcd_flags(args)

        return EtcdRegistry(
            etcd_settings(args),
            subnet_file=Path(args.subnet_file) if args.subnet_file else None,
            ttl=args.subnet_lease_ttl * 60,
            renew_margin=args.subnet_lease_renew_margin * 60,
        )
    from .backends import backend_class
    from .peers.static import StaticRegistry

    config = static_network_config(args)
    if not args.subnet:
        raise UsageError("static mode needs --subnet (this host's subnet), or use --etcd-endpoints")
    own = args.subnet
    peers: dict = {}
    for subnet, ip in args.peer:
        if subnet in peers:
            raise ConfigError(f"peer subnet {subnet} is listed twice")
        peers[subnet] = ip
    static_data = functools.partial(backend_class(config.backend_type).static_backend_data, config=config)
    if args.peers_file:  # at start, name the flag or variable it came from (a reload names the file)
        try:
            Path(args.peers_file).read_bytes()
        except OSError as e:
            what = source(args, "peers_file")
            raise ConfigError(f"cannot read {what} {args.peers_file}: {e.strerror}") from None
    return StaticRegistry(
        config,
        own,
        peers,
        Path(args.peers_file) if args.peers_file else None,
        backend_data_for=static_data,
        subnet_source=source(args, "subnet"),
    )


def udp_flags(args: argparse.Namespace) -> UdpFlags:
    """The udp backend's flags, with the flag or variable each given one came from (another
    backend warns about each, see create_backend)."""
    from .backends import UDP_ONLY

    given = getattr(args, "sources", {})
    dests = {"offload": "no_offload"}  # the field is the positive; the flag turns it off
    sources = {}
    for name in UDP_ONLY:
        if dests.get(name, name) in given:
            sources[name] = given[dests.get(name, name)]
    return UdpFlags(
        tun_name=args.tun_name,
        batch=args.batch,
        port=args.port,
        offload=not args.no_offload,
        allow_any_source=args.allow_any_source,
        max_routes=args.max_routes,
        drop_ring=args.drop_ring,
        workers=args.workers,
        without=frozenset(args.without),
        refuse=frozenset(args.refuse),
        sources=sources,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import Daemon, DaemonOptions, serve
    from .netlink import InterfaceChoice

    observe = cli_observe.observe_options(args)
    registry = make_registry(args)  # bad input is reported before the privilege check
    if os.geteuid() != 0:
        raise UsageError("tunproxy run needs root (CAP_NET_ADMIN) to create devices and routes")
    options = DaemonOptions(
        iface=InterfaceChoice(
            tuple(args.iface),
            tuple(args.iface_regex),
            args.iface_can_reach,
            (source(args, "iface"), source(args, "iface_regex"), source(args, "iface_can_reach")),
        ),
        public_ip=args.public_ip,
        subnet_file=Path(args.subnet_file) if args.subnet_file else None,
        stats_interval=args.stats_interval,
        check_interval=args.check_interval,
        ipmasq=args.ip_masq,
        udp=udp_flags(args),
        observe=observe,
    )
    import uvloop

    uvloop.run(serve(Daemon(registry, options)))
    return 0


def cmd_leases(args: argparse.Namespace) -> int:
    if not args.etcd_endpoints:
        raise UsageError("tunproxy leases needs --etcd-endpoints")
    import uvloop

    from .peers.etcd import etcd_settings, format_leases, list_leases

    check_etcd_flags(args)
    leases = uvloop.run(list_leases(etcd_settings(args)))
    if args.json:
        print(json.dumps(leases, indent=2))
    else:
        print(format_leases(leases))
    return 0


def describe_os_error(error: OSError) -> str:
    """One line for an OSError that names the file or device it concerns, when it has one."""
    text = error.strerror or str(error)
    names = [str(n) for n in (error.filename, error.filename2) if n is not None]
    return f"{text}: {' -> '.join(names)}" if names else text


def first_leaf(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def fail(message: str, code: int) -> int:
    """The one line a user sees for anything that stops us."""
    print(f"tunproxy: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """``tunproxy``: 0 after a clean stop, 2 for bad input, 1 for anything else; never a traceback.

    An unexpected exception is one line naming it, with a hint to rerun with
    ``--log-level debug``, which logs the traceback first.
    """
    try:
        try:
            args, warnings = parse(argv, os.environ if environ is None else environ)
            logging.basicConfig(
                level=args.log_level.upper(),
                format="%(asctime)s %(levelname)s %(message)s",
                stream=sys.stderr,
                force=True,
            )
            for warning in warnings:
                log.warning("%s", warning)
            if args.command in cli_observe.COMMANDS:
                return cli_observe.COMMANDS[args.command](args)
            return cmd_run(args) if args.command == "run" else cmd_leases(args)
        except BaseExceptionGroup as group:  # from the daemon's task group: report the first cause
            raise first_leaf(group) from None
    except (ConfigError, LeaseError, UsageError) as e:
        return fail(str(e), 2)
    except TaskDied as e:
        return fail(str(e), 1)
    except NoDaemon as e:
        print(f"tunproxy: {e}", file=sys.stderr)
        return 3
    except PermissionError as e:
        return fail(f"permission denied: {describe_os_error(e)} (run as root)", 1)
    except OSError as e:
        return fail(describe_os_error(e), 1)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # the last resort: a bug or a case nobody foresaw is still one line
        log.debug("unexpected error", exc_info=True)
        detail = f": {e}" if str(e) else ""
        return fail(
            f"unexpected {type(e).__name__}{detail} (rerun with --log-level debug for the traceback)", 1
        )


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
