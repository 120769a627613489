"""What an etcd key and value under ``<prefix>/subnets/`` say: a lease, an entry, or one line.

``LeaseDecoder`` parses each lease value once and says each bad one once
(per key, again when its value changes); ``entry_from`` turns a key of a
listing into an acquisition ``Entry``. Pure.
"""

from __future__ import annotations

from ipaddress import IPv4Network

from ..logonce import Said
from ..model import Lease, LeaseError, parse_subnet_key
from .acquire import Entry


class LeaseDecoder:
    """Parses lease values, reporting each bad key+value once however often it is seen."""

    def __init__(self) -> None:
        self._said = Said()  # per key: the bad value last reported

    def decode(
        self,
        key: str,
        value: bytes,
        network: IPv4Network | None = None,
        subnet: IPv4Network | None = None,
    ) -> tuple[Lease | None, str | None]:
        """The lease (or None) and a message to log (None if fine or already said).

        ``subnet`` is the key's, when the caller has parsed it already.
        """
        if subnet is None:
            try:
                subnet = parse_subnet_key(key)
            except LeaseError as e:
                return None, self._once(key, b"", f"ignoring {key}: {e}")  # whatever the value
        try:
            lease = Lease.from_value(subnet, value)
        except LeaseError as e:
            return None, self._once(key, value, f"ignoring {key}: {e}")
        if network is not None and not lease.subnet.subnet_of(network):
            message = f"ignoring {key}: {lease.subnet} is outside the network {network}"
            return None, self._once(key, value, message)
        return lease, None

    def _once(self, key: str, value: bytes, message: str) -> str | None:
        return message if self._said.due(key, value) else None

    def forget(self, key: str) -> None:
        """The key was deleted: a bad value written to it again is worth a new line."""
        self._said.forget(key)


def entry_from(key: str, value: bytes, etcd_lease: int, mod_revision: int) -> Entry | None:
    """An acquisition entry; None if the key is not a subnet key at all."""
    try:
        subnet = parse_subnet_key(key)
    except LeaseError:
        return None
    try:
        lease: Lease | None = Lease.from_value(subnet, value)
    except LeaseError:
        lease = None
    return Entry(subnet, lease, etcd_lease, mod_revision)
