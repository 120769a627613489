"""The command line: ``tunproxy run``, ``status``, ``drops`` and ``leases``.

The parser is built here; how a flag's value is read (command line, then
``TUNPROXY_<FLAG>``, then ``FLANNELD_<FLAG>``) is ``tunproxy.flags``; what
``run`` and ``leases`` do with the values is ``tunproxy.cli_run``. Anything
wrong with the input ends in one line on stderr and a non-zero exit, never a
traceback; so does an unexpected exception (the traceback is logged at debug).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from . import __version__, cli_observe
from .backend_config import (
    BACKEND_TYPES,
    BATCH_DEFAULT,
    BATCH_MAX,
    DEFAULT_TUN,
    DROP_RING_DEFAULT,
    DROP_RING_MAX,
    FEATURES,
    MAX_ROUTES,
    WORKERS_MAX,
)
from .cli_run import cmd_leases, cmd_run, static_network_config, udp_flags
from .control import NoDaemon
from .etcd.endpoints import DEFAULT_PREFIX
from .etcd.keeper import DEFAULT_RENEW_MARGIN, DEFAULT_TTL
from .flags import (
    FLANNEL_IGNORED,
    IGNORED_BOOLEANS,
    ArgumentParser,
    UsageError,
    address,
    choice,
    cidr,
    endpoints,
    feature,
    iface,
    ifname,
    integer,
    kube,
    number,
    option,
    peer,
    public_ip,
    regex,
    resolve,
    udp_port,
)
from .model import CHECK_INTERVAL, STATS_INTERVAL, ConfigError, LeaseError
from .supervise import TaskDied

DEFAULT_SUBNET_FILE = "/run/tunproxy/subnet.env"
log = logging.getLogger("tunproxy")
__all__ = ["main", "entry", "parse", "build_parser", "static_network_config", "udp_flags", "ConfigError"]


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
    option(net, "--network", convert=cidr, help="the overlay range, e.g. 10.100.0.0/16")
    option(net, "--subnet", convert=cidr, help="this host's subnet, e.g. 10.100.5.0/24")
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
        convert=choice(*BACKEND_TYPES),
        metavar="{" + ",".join(BACKEND_TYPES) + "}",
        help="backend type (default: the net config's, else udp)",
    )
    option(
        net,
        "--peer",
        action="append",
        default=[],
        convert=peer,
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
        convert=iface,
        metavar="NAME_OR_IP",
        help="interface to use, by name or by one of its IPv4 addresses; repeat to try each in order",
    )
    option(
        host,
        "--iface-regex",
        action="append",
        default=[],
        convert=regex,
        split=False,
        metavar="REGEX",
        help="searched in every interface's addresses, then names; repeatable; tried after --iface",
    )
    option(
        host,
        "--iface-can-reach",
        convert=address,
        metavar="IP",
        help="the interface the kernel routes this address through (ip route get); tried last",
    )
    option(host, "--public-ip", convert=public_ip, help="address peers send to (default: the interface's)")
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
    option(udp, "--port", convert=udp_port, help="UDP port (default: Backend.Port, else 8285)")
    option(
        udp,
        "--batch",
        convert=integer(1, BATCH_MAX),
        default=BATCH_DEFAULT,
        help=f"packets per system call (default {BATCH_DEFAULT})",
    )
    option(
        udp, "--tun-name", convert=ifname, default=DEFAULT_TUN, help=f"TUN device (default {DEFAULT_TUN})"
    )
    option(
        udp,
        "--max-routes",
        convert=integer(0, MAX_ROUTES),
        default=0,
        help="most peer routes the fast path holds (0, the default: every SubnetLen subnet of the "
        "network, at least 4096); leases past it are logged and added when room frees",
    )
    option(
        udp,
        "--drop-ring",
        convert=integer(0, DROP_RING_MAX),
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
        convert=integer(1, WORKERS_MAX),
        metavar="N",
        help="threads moving packets, each with its own TUN queue and UDP socket (SO_REUSEPORT); "
        "1 is one worker (default: one per 2 CPUs, at most 4)",
    )
    option(
        udp,
        "--without",
        action="append",
        default=[],
        convert=feature,
        metavar="FEATURE",
        help="turn one of the data path's speed-ups off, to measure what it buys; repeatable "
        f"({', '.join(FEATURES) or 'none yet'})",
    )
    option(
        udp,
        "--refuse",
        action="append",
        default=[],
        convert=feature,
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
        convert=number(0, False, "minutes"),
        default=DEFAULT_TTL / 60,
        help=f"lease lifetime in minutes (default {DEFAULT_TTL / 60:g} = {DEFAULT_TTL / 3600:g} h)",
    )
    option(
        store,
        "--subnet-lease-renew-margin",
        convert=number(0, False, "minutes"),
        default=DEFAULT_RENEW_MARGIN / 60,
        help=f"renew this many minutes before the lease expires (default {DEFAULT_RENEW_MARGIN / 60:g})",
    )

    misc = run.add_argument_group("logging")
    option(
        misc,
        "--stats-interval",
        convert=number(0, True, "seconds"),
        default=STATS_INTERVAL,
        help="seconds between counter summaries in the log (0: only at exit)",
    )
    option(
        misc,
        "--check-interval",
        convert=number(0, False, "seconds"),
        default=CHECK_INTERVAL,
        help="seconds between checks that restore routes/devices removed behind our back",
    )
    _add_log_level(misc)

    ignored = run.add_argument_group("flannel flags accepted and ignored (one warning each)")
    option(ignored, "--kube-subnet-mgr", default=False, convert=kube, help="refused: no Kubernetes mode")
    for flag in FLANNEL_IGNORED:
        if flag in IGNORED_BOOLEANS:
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
        convert=choice("debug", "info", "warning", "error"),
        default="info",
        metavar="{debug,info,warning,error}",
        help="debug also prints the traceback of an unexpected error",
    )


def _add_etcd_flags(parser: argparse.ArgumentParser) -> None:
    etcd = parser.add_argument_group("etcd")
    option(etcd, "--etcd-endpoints", convert=endpoints, help="comma-separated, e.g. http://192.0.2.100:2379")
    option(etcd, "--etcd-prefix", default=DEFAULT_PREFIX)
    option(etcd, "--etcd-cafile")
    option(etcd, "--etcd-certfile")
    option(etcd, "--etcd-keyfile")
    option(etcd, "--etcd-username")
    option(etcd, "--etcd-password")


def parse(argv: list[str] | None, environ: Mapping[str, str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse the command line and the environment; UsageError/ConfigError for bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return args, resolve(parser, args, environ)


def describe_os_error(error: OSError) -> str:
    """One line for an OSError that names the file or device it concerns, when it has one."""
    text = error.strerror or str(error)
    names = [str(n) for n in (error.filename, error.filename2) if n is not None]
    return f"{text}: {' -> '.join(names)}" if names else text


def first_leaf(group: BaseExceptionGroup) -> BaseException:
    """The first exception at the bottom of nested exception groups (a TaskGroup wraps its tasks' errors)."""
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
    """The ``tunproxy`` console script: exits with ``main()``'s status."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
