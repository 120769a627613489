"""The command line's observing side: ``tunproxy status``, ``tunproxy drops`` and the flags of
``tunproxy run`` that open windows into the daemon (control socket, HTTP, systemd).

Kept apart from ``cli.py`` so the parser there only calls ``add_run_flags`` and
``add_commands``, and ``main`` dispatches through ``COMMANDS``. Bad input is a
ConfigError (one line, exit 2); no daemon is ``control.NoDaemon`` (one line, exit 3).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from .model import ConfigError

SUBNET_FILE_HELP = "the daemon's --subnet-file, to find its control socket"


def _control_flag(group: Any) -> None:
    from .flags import option

    option(
        group,
        "--control-socket",
        metavar="PATH",
        help="the daemon's control socket (default: under /run/tunproxy/, keyed by --subnet-file)",
    )


def add_run_flags(run: argparse.ArgumentParser) -> None:
    """``tunproxy run``'s observing flags; HTTP is flannel's --healthz-ip/--healthz-port."""
    from .flags import address, option, tcp_port

    obs = run.add_argument_group("observing")
    _control_flag(obs)
    option(
        obs,
        "--healthz-ip",
        convert=address,
        default=IPv4Address("0.0.0.0"),
        help="address for /healthz, /readyz, /metrics (default 0.0.0.0, as flannel)",
    )
    option(
        obs,
        "--healthz-port",
        convert=tcp_port,
        help="port for /healthz, /readyz and /metrics (default: no HTTP server, as flannel)",
    )


def add_commands(sub: Any) -> list[argparse.ArgumentParser]:
    """Add ``status`` and ``drops`` to the subcommands; returns their parsers."""
    from .flags import option

    status = sub.add_parser(
        "status",
        help="ask the running daemon: lease, store, peers with counters and rates, drops",
        description="Ask the running daemon over its control socket. Without flags it finds "
        "the only daemon on this machine.",
    )
    _control_flag(status)
    option(status, "--subnet-file", help=SUBNET_FILE_HELP)
    option(status, "--json", default=False, help="one JSON document instead of a table")
    option(status, "--watch", default=False, help="redraw every second, like top")

    drops = sub.add_parser(
        "drops",
        help="the daemon's most recently dropped packets, with reasons and decoded headers",
    )
    _control_flag(drops)
    option(drops, "--subnet-file", help=SUBNET_FILE_HELP)
    option(drops, "--json", default=False, help="JSON instead of a table")
    option(drops, "--pcap", metavar="FILE", help="write them as pcapng (reason in each packet's comment)")
    return [status, drops]


def observe_options(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Any:
    """``ObserveOptions`` from ``tunproxy run``'s flags and systemd's environment variables
    (NOTIFY_SOCKET; WATCHDOG_USEC, ignored when WATCHDOG_PID names another process, as
    sd_watchdog_enabled(3) says)."""
    from .control import default_socket
    from .observer import ObserveOptions

    env = os.environ if environ is None else environ
    healthz_ip = args.healthz_ip  # an IPv4Address, --healthz-port a port: their converters checked
    subnet_file = Path(args.subnet_file) if args.subnet_file else None
    watchdog = env.get("WATCHDOG_USEC", "")
    if env.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
        watchdog = ""
    return ObserveOptions(
        control_socket=Path(args.control_socket) if args.control_socket else default_socket(subnet_file),
        healthz_ip=str(healthz_ip),
        healthz_port=args.healthz_port,
        ipmasq=bool(args.ip_masq),
        notify_socket=env.get("NOTIFY_SOCKET") or None,
        watchdog_usec=int(watchdog) if watchdog.isdigit() else None,
    )


def cmd_status(args: argparse.Namespace) -> int:
    """``tunproxy status``: the daemon's status as text or ``--json``; 0.

    ``--watch`` redraws every second until interrupted. NoDaemon when no daemon
    answers, PermissionError when not root, OSError for a bad answer.
    """
    from .control import query, resolve
    from .observe import format_status

    path = resolve(args.control_socket, args.subnet_file)
    while True:
        doc = query(path, "status")
        if args.json:
            text = json.dumps(doc, indent=None if args.watch else 2)
        else:
            text = format_status(doc)
        if args.watch and not args.json:
            text = "\x1b[H\x1b[2J" + text  # home and clear, as top redraws
        print(text, flush=True)
        if not args.watch:
            return 0
        time.sleep(1)


def cmd_drops(args: argparse.Namespace) -> int:
    """``tunproxy drops``: the daemon's recently dropped packets as text, ``--json`` or a ``--pcap`` file; 0.

    ConfigError if the pcapng file cannot be written; NoDaemon, PermissionError
    and OSError as ``cmd_status``.
    """
    from .control import query, resolve
    from .drops import format_drops, write_pcapng

    doc = query(resolve(args.control_socket, args.subnet_file), "drops")
    if args.pcap:
        try:
            with open(args.pcap, "wb") as f:
                write_pcapng(f, doc["drops"])
        except OSError as e:
            raise ConfigError(f"cannot write --pcap {args.pcap}: {e.strerror}") from None
        print(f"{len(doc['drops'])} dropped packets written to {args.pcap}", file=sys.stderr)
    elif args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(format_drops(doc))
    return 0


COMMANDS = {"status": cmd_status, "drops": cmd_drops}
