"""The rows and the table of ``tunproxy leases``: pure formatting of what listing.py read."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..model import Lease


def format_duration(seconds: float) -> str:
    """A lease's time left as people read it: ``23h59m``, ``4m05s``, ``9s`` (never negative)."""
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
