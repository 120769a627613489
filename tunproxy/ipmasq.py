"""``--ip-masq``: masquerade traffic from the overlay to the outside, as flannel does, with nftables.

flannel (``pkg/trafficmngr/nftables``, 0.25+) puts four rules in a NAT
postrouting chain of its own table; these are the same, in a table of
tunproxy's own (``table ip tunproxy``), so nothing else's rules are touched:

    ip saddr NETWORK ip daddr NETWORK return                        # overlay -> overlay: keep the source
    ip saddr NETWORK ip daddr != 224.0.0.0/4 masquerade fully-random   # overlay -> outside
    ip saddr != NETWORK ip daddr SUBNET return                      # outside -> our pods: keep
    ip saddr != NETWORK ip daddr NETWORK masquerade fully-random    # outside -> other hosts' pods

The table is written in one ``nft -f`` transaction that first creates and
deletes it, so applying is idempotent and atomic; it is re-applied when our
subnet changes, put back by the periodic check if someone deletes it, and
deleted on exit. Everything goes through the ``nft`` command (package
nftables), as kube-proxy's nftables mode does.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from ipaddress import IPv4Network

from .model import ConfigError

log = logging.getLogger("tunproxy")

TABLE = "tunproxy"
MULTICAST = IPv4Network("224.0.0.0/4")


def ruleset(network: IPv4Network, subnet: IPv4Network, table: str = TABLE) -> str:
    """The ``nft -f`` script that (re)creates the table for our ``subnet`` of ``network``."""
    n, s = network, subnet
    return (
        f"table ip {table}\n"
        f"delete table ip {table}\n"
        f"table ip {table} {{\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f"    ip saddr {n} ip daddr {n} return\n"
        f"    ip saddr {n} ip daddr != {MULTICAST} masquerade fully-random\n"
        f"    ip saddr != {n} ip daddr {s} return\n"
        f"    ip saddr != {n} ip daddr {n} masquerade fully-random\n"
        "  }\n"
        "}\n"
    )


async def nft(*args: str, script: str | None = None) -> tuple[int, str]:
    """Run ``nft args`` (feeding ``script`` on stdin); (exit status, stderr's first line)."""
    proc = await asyncio.create_subprocess_exec(
        "nft",
        *args,
        stdin=asyncio.subprocess.PIPE if script is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate(script.encode() if script is not None else None)
    lines = err.decode(errors="replace").strip().splitlines()
    return proc.returncode or 0, lines[0] if lines else ""


class IpMasq:
    """Keeps ``table ip tunproxy`` in place for ``network`` (see the module docstring)."""

    def __init__(self, network: IPv4Network, table: str = TABLE) -> None:
        self.network = network
        self.table = table
        self.subnet: IPv4Network | None = None

    async def check_available(self) -> None:
        """ConfigError (one line) when nft is missing or the kernel refuses nftables."""
        if shutil.which("nft") is None:
            raise ConfigError("--ip-masq needs the nft command (apt install nftables)")
        rc, err = await nft("list", "tables")
        if rc != 0:
            raise ConfigError(f"--ip-masq: nftables is not usable here: {err}")

    async def apply(self, subnet: IPv4Network) -> None:
        """Write the table for ``subnet``; OSError if nft refuses it."""
        rc, err = await nft("-f", "-", script=ruleset(self.network, subnet, self.table))
        if rc != 0:
            raise OSError(f"nft refused the ip-masq rules: {err}")
        if self.subnet != subnet:
            log.info("ip-masq: masquerading %s to outside it (table ip %s)", self.network, self.table)
        self.subnet = subnet

    async def check(self, subnet: IPv4Network) -> None:
        """Put the table back if it is gone (or was never written for ``subnet``)."""
        rc, _ = await nft("list", "chain", "ip", self.table, "postrouting")
        if rc == 0 and self.subnet == subnet:
            return
        if rc != 0 and self.subnet is not None:
            log.warning("ip-masq: table ip %s was deleted; restoring it", self.table)
        await self.apply(subnet)

    async def remove(self) -> None:
        """Delete the table if we wrote it; a failure is logged, not raised (we are stopping)."""
        if self.subnet is None:
            return
        rc, err = await nft("delete", "table", "ip", self.table)
        if rc != 0 and "No such file" not in err:
            log.warning("ip-masq: could not delete table ip %s: %s", self.table, err)
        self.subnet = None
