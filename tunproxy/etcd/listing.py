"""``tunproxy leases``: every lease under the prefix, as rows and as a table."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ..model import Lease
from .connection import RETRYABLE, Client, EtcdSettings, close_client, describe
from .values import LeaseDecoder

log = logging.getLogger(__name__)


async def list_leases(settings: EtcdSettings) -> list[dict[str, Any]]:
    """Every lease under the prefix, as JSON-able dicts; tries each endpoint once.

    ``ttl_left`` is the seconds until the etcd lease expires, or None for a
    reservation. Raises ConnectionError naming the endpoints if none answers.
    """
    errors = []
    decoder = LeaseDecoder()
    prefix = f"{settings.prefix}/subnets/".encode()
    for endpoint in settings.endpoints:
        client = Client(endpoint, settings)
        try:
            await client.connect()
            resp = await client.get_prefix(prefix)
            rows = []
            ttls: dict[int, int] = {}
            for kv in resp.kvs:
                lease, message = decoder.decode(kv.key.decode(errors="replace"), kv.value)
                if lease is None:
                    if message:
                        log.warning("%s", message)
                    continue
                ttl_left: int | None = None
                if kv.lease:
                    if kv.lease not in ttls:
                        info = await client.get_lease_info(kv.lease, keys=False)
                        ttls[kv.lease] = max(0, info.TTL)
                    ttl_left = ttls[kv.lease]
                rows.append((lease, ttl_left))
            rows.sort(key=lambda r: r[0].subnet)
            return [lease_row(lease, ttl) for lease, ttl in rows]
        except RETRYABLE as e:
            errors.append(f"{endpoint.url}: {describe(e)}")
        finally:
            await close_client(client)
    raise ConnectionError(f"etcd unreachable ({'; '.join(errors)})")


def format_duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def format_leases(leases: Sequence[Mapping[str, Any]]) -> str:
    """A table of ``list_leases`` output: SUBNET PUBLIC-IP BACKEND EXPIRES-IN."""
    rows = [("SUBNET", "PUBLIC-IP", "BACKEND", "EXPIRES-IN")]
    for lease in leases:
        ttl = lease.get("ttl_left")
        rows.append(
            (
                str(lease["subnet"]),
                str(lease["public_ip"]),
                str(lease.get("backend_type") or ""),
                "never (reserved)" if ttl is None else format_duration(ttl),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3] for row in rows
    )


def lease_row(lease: Lease, ttl_left: int | None) -> dict[str, Any]:
    """One JSON-able row of ``tunproxy leases --json``."""
    return {
        "subnet": str(lease.subnet),
        "public_ip": str(lease.public_ip),
        "backend_type": lease.backend_type,
        "backend_data": json.loads(json.dumps(lease.backend_data)),
        "ttl_left": ttl_left,
    }
