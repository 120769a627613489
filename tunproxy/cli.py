"""The command line: ``tunproxy run``, ``status``, ``drops`` and ``leases``.

Every flag can also come from the environment as ``TUNPROXY_<FLAG>``
(``--etcd-endpoints`` -> ``TUNPROXY_ETCD_ENDPOINTS``); a flag on the command
line wins. Anything wrong with the input ends in one line on stderr and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from . import __version__, cli_observe
from .control import NoDaemon
from .subnets import KNOWN_BACKENDS, ConfigError, LeaseError, NetworkConfig, parse_address, parse_network

ENV_PREFIX = "TUNPROXY_"
DEFAULT_SUBNET_FILE = "/run/tunproxy/subnet.env"
log = logging.getLogger("tunproxy")


class UsageError(Exception):
    """Bad input found after argparse: printed as one line, exit 2."""


def _env_name(dest: str) -> str:
    return ENV_PREFIX + dest.upper()


def apply_env_defaults(parser: argparse.ArgumentParser, environ: dict[str, str]) -> None:
    """Let TUNPROXY_<FLAG> supply any flag's default, so a command line still wins."""
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "version"):
            continue
        raw = environ.get(_env_name(action.dest))
        if raw is None:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            action.default = raw.strip().lower() in ("1", "true", "yes", "on")
        elif isinstance(action, argparse._AppendAction):
            action.default = [p for p in raw.replace(",", " ").split() if p]
        else:
            action.default = action.type(raw) if callable(action.type) else raw
        action.required = False


def build_parser(environ: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``environ``, TUNPROXY_<FLAG> variables become the flags' defaults."""
    parser = argparse.ArgumentParser(prog="tunproxy", description="A flannel-style IPv4 overlay.")
    parser.add_argument("--version", action="version", version=f"tunproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="join the overlay and forward traffic until SIGINT/SIGTERM",
        description="Join the overlay and forward traffic until SIGINT/SIGTERM. "
        "Peers come from --etcd-endpoints if given, else from --peer/--peers-file "
        "(SIGHUP re-reads the peers file).",
    )
    net = run.add_argument_group("network (static mode)")
    net.add_argument("--network", help="the overlay range, e.g. 10.100.0.0/16")
    net.add_argument("--subnet", help="this host's subnet, e.g. 10.100.5.0/24")
    net.add_argument("--net-config", metavar="FILE", help="flannel net-conf.json instead of --network")
    net.add_argument(
        "--backend", choices=KNOWN_BACKENDS, help="backend type (default: the net config's, else udp)"
    )
    net.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="PUBLIC_IP=SUBNET",
        help="a peer host and its subnet; repeat for more",
    )
    net.add_argument(
        "--peers-file",
        metavar="FILE",
        help='JSON list of {"PublicIP": ..., "Subnet": ...}; re-read on SIGHUP',
    )

    host = run.add_argument_group("this host")
    host.add_argument("--iface", help="underlay interface (default: the default route's)")
    host.add_argument("--public-ip", help="address peers send to (default: --iface's address)")
    host.add_argument("--subnet-file", default=DEFAULT_SUBNET_FILE, help="where to write subnet.env")
    host.add_argument(
        "--ip-masq",
        action="store_true",
        help="masquerade traffic from the overlay to outside it (nftables table ip tunproxy); "
        "also FLANNEL_IPMASQ=true in subnet.env",
    )
    cli_observe.add_run_flags(run)

    udp = run.add_argument_group("udp backend")
    udp.add_argument("--port", type=int, help="UDP port (default 8285, or Backend.Port)")
    udp.add_argument("--batch", type=int, default=64, help="packets per system call (default 64)")
    udp.add_argument("--tun-name", default="tunproxy0", help="TUN device name (default tunproxy0)")
    udp.add_argument(
        "--drop-ring",
        type=int,
        default=256,
        help="dropped packets kept for tunproxy drops (default 256; 0: none)",
    )
    udp.add_argument(
        "--no-offload",
        action="store_true",
        help="one packet per TUN read/write: no TSO on the TUN, no UDP GSO/GRO (same wire format)",
    )

    _add_etcd_flags(run)
    store = run.add_argument_group("leases")
    store.add_argument(
        "--subnet-lease-ttl",
        type=float,
        default=24 * 60,
        help="lease lifetime in minutes (default 1440 = 24 h)",
    )
    store.add_argument(
        "--subnet-lease-renew-margin",
        type=float,
        default=60,
        help="renew this many minutes before the lease expires (default 60)",
    )

    misc = run.add_argument_group("logging")
    misc.add_argument(
        "--stats-interval",
        type=float,
        default=60.0,
        help="seconds between counter summaries in the log (0: only at exit)",
    )
    misc.add_argument(
        "--check-interval",
        type=float,
        default=10.0,
        help="seconds between checks that restore routes/devices removed behind our back",
    )
    misc.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))

    leases = sub.add_parser("leases", help="list the leases in etcd")
    _add_etcd_flags(leases)
    leases.add_argument("--json", action="store_true", help="print JSON instead of a table")
    asking = cli_observe.add_commands(sub)
    if environ is not None:
        for subparser in (run, leases, *asking):
            apply_env_defaults(subparser, environ)
    return parser


def _add_etcd_flags(parser: argparse.ArgumentParser) -> None:
    etcd = parser.add_argument_group("etcd")
    etcd.add_argument("--etcd-endpoints", help="comma-separated, e.g. http://192.0.2.100:2379")
    etcd.add_argument("--etcd-prefix", default="/coreos.com/network")
    etcd.add_argument("--etcd-cafile")
    etcd.add_argument("--etcd-certfile")
    etcd.add_argument("--etcd-keyfile")
    etcd.add_argument("--etcd-username")
    etcd.add_argument("--etcd-password")


def static_network_config(args: argparse.Namespace) -> NetworkConfig:
    if args.net_config:
        try:
            text = Path(args.net_config).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read --net-config {args.net_config}: {e.strerror}") from None
        config = NetworkConfig.parse(text)
        if args.network and parse_network(args.network, "--network") != config.network:
            raise ConfigError(f"--network {args.network} disagrees with {args.net_config}")
    elif args.network:
        doc: dict[str, Any] = {"Network": args.network}
        if args.subnet:
            doc["SubnetLen"] = parse_network(args.subnet, "--subnet").prefixlen
        config = NetworkConfig.parse(doc)
    else:
        raise UsageError("give --network (or --net-config), or --etcd-endpoints")
    if args.backend and args.backend != config.backend_type:
        config = NetworkConfig(
            config.network,
            config.subnet_len,
            config.subnet_min,
            config.subnet_max,
            args.backend,
            config.backend,
        )
    return config


def make_registry(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    if args.etcd_endpoints:
        from .peers.etcd import EtcdRegistry, etcd_settings

        return EtcdRegistry(
            etcd_settings(args),
            subnet_file=Path(args.subnet_file) if args.subnet_file else None,
            ttl=args.subnet_lease_ttl * 60,
            renew_margin=args.subnet_lease_renew_margin * 60,
        )
    from .backends import backend_class
    from .peers.static import StaticRegistry, parse_peer_flag

    config = static_network_config(args)
    if not args.subnet:
        raise UsageError("static mode needs --subnet (this host's subnet), or use --etcd-endpoints")
    peers: dict = {}
    for text in args.peer:
        subnet, ip = parse_peer_flag(text)
        if subnet in peers:
            raise ConfigError(f"peer subnet {subnet} is listed twice")
        peers[subnet] = ip
    static_data = getattr(backend_class(config.backend_type), "static_backend_data", None)
    if static_data is not None:
        static_data = functools.partial(static_data, config=config)
    return StaticRegistry(
        config,
        parse_network(args.subnet, "--subnet"),
        peers,
        Path(args.peers_file) if args.peers_file else None,
        backend_data_for=static_data,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import Daemon, DaemonOptions, serve

    if args.batch < 1 or args.batch > 1024:
        raise UsageError(f"--batch {args.batch} must be between 1 and 1024")
    if not 0 <= args.drop_ring <= 65536:
        raise UsageError(f"--drop-ring {args.drop_ring} must be between 0 and 65536")
    if args.port is not None and not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port} is not a UDP port")
    observe = cli_observe.observe_options(args)
    registry = make_registry(args)  # bad input is reported before the privilege check
    if os.geteuid() != 0:
        raise UsageError("tunproxy run needs root (CAP_NET_ADMIN) to create devices and routes")
    options = DaemonOptions(
        iface=args.iface,
        public_ip=parse_address(args.public_ip, "--public-ip") if args.public_ip else None,
        subnet_file=Path(args.subnet_file) if args.subnet_file else None,
        stats_interval=args.stats_interval,
        check_interval=args.check_interval,
        ipmasq=args.ip_masq,
        backend_options={
            "tun_name": args.tun_name,
            "batch": args.batch,
            "port": args.port,
            "offload": not args.no_offload,
            "drop_ring": args.drop_ring,
        },
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

    leases = uvloop.run(list_leases(etcd_settings(args)))
    if args.json:
        print(json.dumps(leases, indent=2))
    else:
        print(format_leases(leases))
    return 0


def first_leaf(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def main(argv: list[str] | None = None) -> int:
    args = build_parser(dict(os.environ)).parse_args(argv)
    level = getattr(args, "log_level", "info").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        try:
            if args.command in cli_observe.COMMANDS:
                return cli_observe.COMMANDS[args.command](args)
            return cmd_run(args) if args.command == "run" else cmd_leases(args)
        except BaseExceptionGroup as group:  # from the daemon's task group: report the first cause
            raise first_leaf(group) from None
    except (ConfigError, LeaseError, UsageError) as e:
        print(f"tunproxy: error: {e}", file=sys.stderr)
        return 2
    except NoDaemon as e:
        print(f"tunproxy: {e}", file=sys.stderr)
        return 3
    except PermissionError as e:
        print(f"tunproxy: error: permission denied: {e.strerror or e} (run as root)", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"tunproxy: error: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
