"""``tunproxy leases``: every lease under the prefix, read from etcd (the rows and the table are
``etcd/table.py``'s)."""

from __future__ import annotations

import logging
from typing import Any

from .connection import RETRYABLE, Client, EtcdSettings, close_client, describe
from .table import lease_row
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
