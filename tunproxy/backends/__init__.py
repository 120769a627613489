"""Backends by name. The daemon asks for one by ``Backend.Type`` and never learns which it got."""

from __future__ import annotations

import importlib
import logging

from ..backend_config import BACKEND_TYPES, UDP_ONLY
from ..model import ConfigError
from .base import Backend, BackendContext

log = logging.getLogger("tunproxy")


def backend_class(name: str) -> type[Backend]:
    """Look a backend up by its flannel name (a key of ``BACKEND_TYPES``; ``host-gw`` lives in
    ``host_gw.py``); imports lazily so udp needs no vxlan code. ValueError for an unknown name."""
    if name not in BACKEND_TYPES:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_TYPES)}")
    module = importlib.import_module(f"{__name__}.{name.replace('-', '_')}")
    cls: type[Backend] = module.BACKEND
    return cls


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
        for name in UDP_ONLY:
            if name in ctx.flags.sources:
                log.warning(
                    "ignoring %s: only the udp backend uses it, the backend is %s",
                    ctx.flags.sources[name],
                    ctx.network.backend_type,
                )
    return backend_class(ctx.network.backend_type)(ctx)


__all__ = ["Backend", "BackendContext", "backend_class", "check_underlay", "create_backend"]
