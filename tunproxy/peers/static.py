"""A static peer list, for lab VMs with no store: --peer flags plus an optional file.

The file is flannel's lease shape, a JSON list of ``{"PublicIP": ..., "Subnet": ...}``
(``BackendType``/``BackendData`` optional). SIGHUP re-reads it and the daemon
applies the difference without a restart; a file that fails to parse is
reported in one line and the previous table stays in force.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from ..model import ConfigError, Lease, NetworkConfig, check_peers, parse_network, parse_public_ip
from .base import Registry, Snapshot, Update

log = logging.getLogger(__name__)


def parse_peer_flag(text: str, what: str = "--peer") -> tuple[IPv4Network, IPv4Address]:
    """``192.0.2.12=10.100.18.0/24`` -> (subnet, public ip); ConfigError naming ``what`` if malformed."""
    ip, sep, subnet = text.partition("=")
    if not sep:
        raise ConfigError(f"{what} {text!r} must look like 192.0.2.12=10.100.18.0/24")
    return parse_network(subnet, f"{what} {text!r}: subnet"), parse_public_ip(ip, f"{what} {text!r}: address")


def parse_peers_file(text: str, source: str = "peers file") -> list[Lease]:
    """A peers file's text -> leases; ConfigError naming ``source`` and the entry if it is malformed."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{source} is not valid JSON: {e}") from None
    if not isinstance(doc, list):
        raise ConfigError(f'{source} must be a JSON list of {{"PublicIP": ..., "Subnet": ...}}')
    leases = []
    for i, item in enumerate(doc):
        if not isinstance(item, Mapping) or "PublicIP" not in item or "Subnet" not in item:
            raise ConfigError(f"{source} entry {i} needs PublicIP and Subnet: {str(item)[:60]}")
        leases.append(
            Lease(
                parse_network(item["Subnet"], f"{source} entry {i} Subnet"),
                parse_public_ip(item["PublicIP"], f"{source} entry {i} PublicIP"),
                str(item.get("BackendType") or ""),
                item.get("BackendData"),
            )
        )
    return leases


class StaticRegistry(Registry):
    """Our subnet and the peers as given; ``updates`` yields them again after each SIGHUP reload.

    ``backend_data_for(public_ip)`` fills in a peer's BackendData when its
    entry has none (the backend's ``static_backend_data``). ConfigError at
    construction (naming ``subnet_source`` for our own subnet) for a subnet
    outside the network, overlapping peers, or a peers file that does not parse.
    """

    def __init__(
        self,
        config: NetworkConfig,
        own_subnet: IPv4Network,
        peers: Mapping[IPv4Network, IPv4Address],
        peers_file: Path | None = None,
        backend_data_for: Any = None,
        subnet_source: str = "--subnet",
        peers_file_source: str = "--peers-file",
    ) -> None:
        config.check_subnet(own_subnet, subnet_source)
        self.config = config
        self.own_subnet = own_subnet
        self.flag_peers = dict(peers)
        self.peers_file = peers_file
        # A static peer's BackendData is computed (e.g. vxlan's VtepMAC from its public IP).
        self.backend_data_for = backend_data_for
        self._reloaded = asyncio.Event()
        # ConfigError at start: a bad file stops us early, naming the flag or variable it came by
        # (a reload names the file: the flag is long gone by then).
        self.current = self._load(peers_file_source)

    def _load(self, what: str = "peers file") -> tuple[Lease, ...]:
        leases = {s: Lease(s, ip, self.config.backend_type) for s, ip in self.flag_peers.items()}
        if self.peers_file is not None:
            try:
                text = self.peers_file.read_text()
            except OSError as e:
                raise ConfigError(f"cannot read {what} {self.peers_file}: {e.strerror}") from None
            except UnicodeDecodeError:
                raise ConfigError(f"{what} {self.peers_file} is not UTF-8 text") from None
            for lease in parse_peers_file(text, str(self.peers_file)):
                if lease.subnet in leases:
                    raise ConfigError(f"peer subnet {lease.subnet} is listed twice")
                leases[lease.subnet] = lease
        check_peers(self.own_subnet, self.config.network, {s: lease.public_ip for s, lease in leases.items()})
        return tuple(self._complete(lease) for lease in leases.values())

    def _complete(self, lease: Lease) -> Lease:
        backend_type = lease.backend_type or self.config.backend_type
        data = lease.backend_data
        if data is None and self.backend_data_for is not None:
            data = self.backend_data_for(lease.public_ip)
        return Lease(lease.subnet, lease.public_ip, backend_type, data)

    async def network_config(self) -> NetworkConfig:
        """The config given at construction; never waits."""
        return self.config

    async def acquire(self, public_ip: IPv4Address, backend_type: str, backend_data: Any) -> Lease:
        """Our ``--subnet`` as given; nothing is stored anywhere."""
        return Lease(self.own_subnet, public_ip, backend_type, backend_data)

    def describe(self) -> dict[str, Any]:
        """``kind`` static, the ``peers_file`` (None without one) and how many ``peers`` it gives."""
        return {
            "kind": "static",
            "peers_file": str(self.peers_file) if self.peers_file else None,
            "peers": len(self.current),
        }

    def reload(self) -> None:
        """Re-read the peers file; one that does not parse is logged and the previous peers stay."""
        try:
            self.current = self._load()
        except ConfigError as e:
            log.error("peers not reloaded, keeping the previous %d: %s", len(self.current), e)
            return
        log.info("peers reloaded: %d", len(self.current))
        self._reloaded.set()

    async def updates(self) -> AsyncIterator[Update]:
        """A Snapshot at start and another after each reload that parsed; never Changes."""
        yield Snapshot(self.current)
        while True:
            await self._reloaded.wait()
            self._reloaded.clear()
            yield Snapshot(self.current)
