"""The lab's addressing plan, written once for the demos, the tests and the bench.

Underlay addresses come from the documentation ranges of RFC 5737
(192.0.2.0/24 TEST-NET-1 for the hosts' segment ``br0``, 198.51.100.0/24
TEST-NET-2 for a second segment behind a router), so nothing in a lab can
collide with a real network; the overlay is 10.100.0.0/16 (flannel's
``Network``). The three standard hosts hold fixed /24 leases that are not
adjacent (5, 18, 7), so a test that confuses two of them fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network

NETWORK = "10.100.0.0/16"  # flannel's Network, as --network and the etcd config give it
UNDERLAY = "192.0.2.0/24"  # the hosts' segment, a bridge named SEGMENT in the switch namespace
SEGMENT = "br0"
ETCD_ADDRESS = "192.0.2.100"  # the switch namespace's address on br0, where a lab's etcd listens
ETCD_MEMBERS = ("192.0.2.101", "192.0.2.102", "192.0.2.103")  # a three-member cluster on br0
STRANGER_ADDRESS = "192.0.2.99"  # a host on br0 that runs no tunproxy and is nobody's peer
ROUTED_UNDERLAY = "198.51.100.0/24"  # a second segment, br1, behind router ``r``
ROUTED_SEGMENT = "br1"
ROUTER = {SEGMENT: "192.0.2.1", ROUTED_SEGMENT: "198.51.100.1"}  # router r's leg on each segment


@dataclass(frozen=True)
class LabHost:
    """One host of the plan: its namespace name, underlay address and overlay subnet.

    ``public_ip`` is flannel's PublicIP (the underlay address peers send to,
    dotted quad); ``subnet`` the /24 it holds in NETWORK (CIDR).
    """

    name: str
    public_ip: str
    subnet: str

    @property
    def overlay(self) -> str:
        """Its overlay address: the subnet's first address, what each backend puts on its device."""
        return self.subnet.split("/")[0]

    @property
    def peer(self) -> str:
        """The host as ``--peer`` takes it: ``PublicIP=Subnet``."""
        return f"{self.public_ip}={self.subnet}"


def _table(*hosts: LabHost) -> dict[str, LabHost]:
    return {host.name: host for host in hosts}


# The standard three hosts on br0.
HOSTS = _table(
    LabHost("h1", "192.0.2.11", "10.100.5.0/24"),
    LabHost("h2", "192.0.2.12", "10.100.18.0/24"),
    LabHost("h3", "192.0.2.13", "10.100.7.0/24"),
)

# The same hosts with h3 moved to br1, reached from br0 through router r.
ROUTED_HOSTS = _table(HOSTS["h1"], HOSTS["h2"], LabHost("h3", "198.51.100.13", "10.100.7.0/24"))


def pairs(hosts: dict[str, LabHost] = HOSTS) -> dict[str, tuple[str, str]]:
    """``{name: (public_ip, subnet)}``: the shape a peers file and the tests' mesh helpers take."""
    return {name: (host.public_ip, host.subnet) for name, host in hosts.items()}


def underlay_address(index: int) -> str:
    """The address on br0 of numbered host ``index`` (1 to 88): 192.0.2.(10 + index).

    h1 to h3 of HOSTS are 1 to 3; the bench's larger labs number theirs on.
    Raises ValueError outside 1..88, where the plan keeps other addresses (.99 and up).
    """
    if not 1 <= index <= 88:
        raise ValueError(f"lab host index {index} is not in 1..88")
    return str(IPv4Network(UNDERLAY)[10 + index])
