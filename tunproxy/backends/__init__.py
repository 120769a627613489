"""Backends by name. The daemon asks for one by ``Backend.Type`` and never learns which it got."""

from __future__ import annotations

import importlib
import logging

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


def create_backend(ctx: BackendContext) -> Backend:
    """The backend for the config's type; first, one warning line per config field it ignores."""
    for warning in ctx.network.warnings:
        log.warning("network config: %s", warning)
    return backend_class(ctx.network.backend_type)(ctx)


__all__ = ["Backend", "BackendContext", "backend_class", "create_backend"]
