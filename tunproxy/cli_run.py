"""``tunproxy run`` and ``tunproxy leases``: from parsed flags to a registry, options and a daemon.

With ``cli_observe.observe_options`` (the observing flags), the only place the
argparse Namespace is read after parsing: everything past here takes typed
values (NetworkConfig, UdpFlags, EtcdSettings, DaemonOptions).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import cli_observe
from .backend_config import UDP_ONLY, UdpFlags
from .flags import UsageError, source
from .model import ConfigError, NetworkConfig

log = logging.getLogger("tunproxy")

STATIC_ONLY = ("network", "net_config", "subnet", "peer", "peers_file", "backend")
"""Flags of static mode (their argparse dests), which etcd mode ignores with one warning each."""

if TYPE_CHECKING:
    from .etcd.connection import EtcdSettings
    from .peers.base import Registry


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
    if args.backend:
        config = config.with_backend(args.backend, f"{source(args, 'backend')} is {args.backend}")
    return config


def etcd_settings(args: argparse.Namespace) -> EtcdSettings:
    """EtcdSettings from the ``--etcd-*`` flags, checked there once (ConfigError naming the flag
    or variable each value came from)."""
    from .etcd.connection import EtcdSettings
    from .etcd.endpoints import DEFAULT_PREFIX

    names = {k: source(args, f"etcd_{k}") for k in ("cafile", "certfile", "keyfile", "username", "password")}
    return EtcdSettings.create(
        args.etcd_endpoints,
        getattr(args, "etcd_prefix", None) or DEFAULT_PREFIX,
        getattr(args, "etcd_cafile", None),
        getattr(args, "etcd_certfile", None),
        getattr(args, "etcd_keyfile", None),
        getattr(args, "etcd_username", None),
        getattr(args, "etcd_password", None),
        names=names,
    )


def make_registry(args: argparse.Namespace) -> Registry:
    """The etcd registry when ``--etcd-endpoints`` is given, else the static one from the flags.

    The lease TTL and renew margin flags are minutes; the registry takes
    seconds. UsageError without ``--subnet`` in static mode, ConfigError for a
    peer subnet given twice or a bad ``--net-config``/peers file.
    """
    if args.etcd_endpoints:
        from .etcd.registry import EtcdRegistry

        for dest in STATIC_ONLY:
            if dest in getattr(args, "sources", {}):
                log.warning(
                    "ignoring %s: with --etcd-endpoints, etcd holds the network and the leases",
                    source(args, dest),
                )

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
    return StaticRegistry(
        config,
        own,
        peers,
        Path(args.peers_file) if args.peers_file else None,
        backend_data_for=static_data,
        subnet_source=source(args, "subnet"),
        peers_file_source=source(args, "peers_file"),
    )


def udp_flags(args: argparse.Namespace) -> UdpFlags:
    """The udp backend's flags, with the flag or variable each given one came from (another
    backend warns about each, see create_backend)."""

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
    """``tunproxy run``: the daemon until a signal stops it; 0 after a clean stop.

    Bad flags are reported before the root check (UsageError when not root);
    the daemon runs on a uvloop event loop.
    """
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
    """``tunproxy leases``: etcd's leases, a table or ``--json``; UsageError without ``--etcd-endpoints``."""
    if not args.etcd_endpoints:
        raise UsageError("tunproxy leases needs --etcd-endpoints")
    import uvloop

    from .etcd.listing import list_leases
    from .etcd.table import format_leases

    leases = uvloop.run(list_leases(etcd_settings(args)))
    if args.json:
        print(json.dumps(leases, indent=2))
    else:
        print(format_leases(leases))
    return 0
