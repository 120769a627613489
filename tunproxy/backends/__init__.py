"""Backends by name. The daemon asks for one by ``Backend.Type`` and never learns which it got."""

from __future__ import annotations

import importlib
import logging

from ..subnets import ConfigError
from .base import Backend, BackendContext

log = logging.getLogger("tunproxy")

_MODULES = {"udp": "udp", "vxlan": "vxlan", "host-gw": "host_gw"}


def backend_class(name: str) -> type[Backend]:
    """Look a backend up by its flannel name; imports lazily so udp needs no vxlan code."""
    try:
        module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(_MODULES)}") from None
    cls: type[Backend] = module.BACKEND
    return cls


UDP_ONLY = ("port", "batch", "tun_name", "max_routes", "drop_ring", "no_offload", "allow_any_source")
"""The dests of ``tunproxy run``'s udp backend flags; another backend ignores them, with a warning."""


def check_underlay(ctx: BackendContext) -> None:
    """Refuse an overlay Network that covers the underlay: its routes would capture the tunnel's own packets.

    A Network holding the underlay or public address (``0.0.0.0/1`` on a
    host at 10.0.0.5, say) would send encapsulated packets into the overlay
    and cut the host off; ConfigError names both.
    """
    network, u = ctx.network.network, ctx.underlay
    for what, address in (("the address", u.address), ("the public IP", ctx.public_ip)):
        if address in network:
            raise ConfigError(
                f"Network {network} contains {what} {address} of {u.name}: the overlay must not cover "
                "the underlay (it would route the tunnel's own packets into itself)"
            )


def create_backend(ctx: BackendContext) -> Backend:
    """The backend for the config's type; first, one warning line per config field or flag it ignores.

    Raises ConfigError for a Network that covers the underlay (see check_underlay).
    """
    for warning in ctx.network.warnings:
        log.warning("network config: %s", warning)
    check_underlay(ctx)
    if ctx.network.backend_type != "udp":
        given = ctx.options.get("sources", {})
        for dest in UDP_ONLY:
            if dest in given:
                log.warning(
                    "ignoring %s: only the udp backend uses it, the backend is %s",
                    given[dest],
                    ctx.network.backend_type,
                )
    return backend_class(ctx.network.backend_type)(ctx)


__all__ = ["UDP_ONLY", "Backend", "BackendContext", "backend_class", "check_underlay", "create_backend"]
