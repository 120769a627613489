"""Write the fuzzers' seed corpus: small valid inputs in each target's format.

    python3 -m fuzz.make_corpus    # rewrites fuzz/corpus/{packets,routes}/seed-*

Seeds matter because libFuzzer mutates what it has: starting from sound
packets (a TSO read, a TCP train for GRO coalescing, a spoofed source, an
expiring TTL) it reaches the deep code at once instead of searching for a
valid IPv4 checksum.  The formats are described at the top of each harness
(fuzz_packets.c, fuzz_routes.c); the packets are built by tests/support/packets.py,
the same twin the unit tests trust.  Regression inputs (a crash the fuzzer
found, once fixed) are committed beside the seeds as ``regress-*`` and are
not touched here.
"""

from __future__ import annotations

import hashlib
import struct
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from tests.support import packets as h
from tests.support.packets import VnetHdr

HERE = Path(__file__).resolve().parent
OFFLOAD, GSO, ANY_SOURCE, SMALL_TUN_BUFFER, SMALL_SLOTS, USO, FAST_CSUM, NO_SIMD = 1, 2, 4, 8, 16, 32, 64, 128
TX, RX, TIME, ROUTES, FAULT, GROW = range(6)
FIX_LEN, FIX_VERSION, FIX_L4, FIX_IP, FIX_PARTIAL = 1, 2, 4, 8, 16
P0, P1, P2, P3, STRANGER = range(5)  # 192.0.2.1 .. 192.0.2.4, and 198.51.100.1 (no peer)
OURS = "10.244.0.9"


def route(net: str, peer: int | None = None) -> bytes:
    n = IPv4Network(net)
    out = struct.pack("<IB", int(n.network_address), n.prefixlen)
    return out if peer is None else out + bytes([peer])


def packet(data: bytes, fix: int = 0, pad_to: int = 0) -> bytes:
    """A packet spec: fix-ups, total length (data then zeros), the data."""
    return struct.pack("<BHH", fix, max(pad_to, len(data)), len(data)) + data


def header(
    flags: int, routes: list[bytes], *, mtu: int = 1400, batch: int = 64, max_routes: int = 32
) -> bytes:
    out = struct.pack("<BHBBBBB", flags, mtu - 68, batch - 1, 100, 50, len(routes), max_routes - 1)
    if flags & OFFLOAD:
        out += struct.pack("<BH", 159, 0)
    return out + b"".join(routes)


def tx(*specs: bytes) -> bytes:
    return bytes([TX, len(specs) - 1]) + b"".join(specs)


def rx(*datagrams: bytes) -> bytes:
    return bytes([RX, len(datagrams) - 1]) + b"".join(datagrams)


def datagram(sender: int, *segments: bytes, gro: int = 0) -> bytes:
    return struct.pack("<BHB", sender, gro, len(segments) - 1) + b"".join(segments)


def udp(src: str, dst: str, size: int = 16, **kw: object) -> bytes:
    return h.build_ipv4(src=src, dst=dst, payload=bytes(i % 256 for i in range(size)), **kw)  # type: ignore[arg-type]


def udp_train(src: str, dst: str, size: int, count: int, last: int | None = None) -> list[bytes]:
    """One flow's datagrams as a UDP_SEGMENT sender's train arrives (USO coalesces these)."""
    out = []
    for i in range(count):
        n = size if i < count - 1 or last is None else last
        header = struct.pack("!HHHH", 4000, 5300, 8 + n, 0)
        packet = h.build_ipv4(src=src, dst=dst, ident=9 + i, df=True, payload=header + bytes([i]) * n)
        out.append(h.with_partial_checksum(packet, 6, complete=True))
    return out


def tcp_train(src: str, dst: str, mss: int, count: int, last: int | None = None) -> list[bytes]:
    """One flow's consecutive segments, as a TSO sender cut them (GRO merges these)."""
    out = []
    for i in range(count):
        size = mss if i < count - 1 or last is None else last
        out.append(
            h.build_tcp(src=src, dst=dst, seq=1000 + i * mss, ident=7 + i, payload=bytes([i]) * size, df=True)
        )
    return out


MESH = [
    route("10.1.0.0/16", P0),
    route("10.2.0.0/16", P1),
    route("10.2.9.0/24", P0),
    route("10.3.0.0/16", P2),
]


def packets_seeds() -> dict[str, bytes]:
    seeds = {}
    plain_tx = tx(
        packet(udp(OURS, "10.1.0.5")),
        packet(udp(OURS, "10.2.9.5")),
        packet(udp(OURS, "10.9.0.1")),  # no route: net unreachable
        packet(udp(OURS, "10.2.0.5", ttl=1)),  # time exceeded
        packet(udp(OURS, "10.3.0.5", size=1400, df=True)),  # frag needed
        packet(
            h.build_ipv4(src=OURS, dst="10.1.0.5", proto=1, payload=b"\x03\x00" + bytes(30))
        ),  # an ICMP error
        packet(b"\x45" + bytes(30)),  # malformed
    )
    # One sender per RX operation (strangers aside), so the harness knows exactly
    # whose subnet every delivered source must be in.
    plain_rx = rx(
        datagram(P0, packet(udp("10.1.0.7", OURS))),
        datagram(P0, packet(udp("10.2.0.7", OURS))),  # spoofed: P1's subnet
        datagram(P0, packet(udp("10.2.9.7", OURS))),  # P0's, by the longer prefix
        datagram(STRANGER, packet(udp("10.1.0.7", OURS))),
        datagram(P0, packet(b"garbage")),
    ) + rx(
        datagram(P1, packet(udp("10.2.0.7", OURS, ttl=1))),  # time exceeded, back over UDP
        datagram(P1, packet(udp("10.1.0.7", OURS, ttl=1))),  # spoofed: no ICMP error for it
        datagram(P1, packet(udp("10.2.0.8", OURS))),
    )
    seeds["plain"] = header(0, MESH) + plain_tx + plain_rx + bytes([TIME, 0xE8, 0x03]) + plain_tx
    seeds["plain-any-source"] = header(ANY_SOURCE, MESH) + plain_rx
    seeds["plain-small"] = (
        header(SMALL_SLOTS | SMALL_TUN_BUFFER, MESH, mtu=576, batch=4) + plain_tx + plain_rx
    )

    big = h.build_tcp(src=OURS, dst="10.1.0.5", payload=bytes(range(256)) * 12, df=True, flags=0x19)
    vnet = VnetHdr(h.VNET_F_NEEDS_CSUM, h.GSO_TCPV4, 0, 1000, 20, 16).pack()
    csum_udp = h.with_partial_checksum(udp(OURS, "10.2.0.5", size=100), 6)
    csum_vnet = VnetHdr(h.VNET_F_NEEDS_CSUM, h.GSO_NONE, 0, 0, 20, 6).pack()
    plain_vnet = VnetHdr().pack()
    offload_tx = tx(
        vnet + packet(h.with_partial_checksum(big, 16), FIX_PARTIAL | FIX_IP),
        csum_vnet + packet(csum_udp),
        plain_vnet + packet(udp(OURS, "10.1.0.6")),
        plain_vnet + packet(udp(OURS, "10.9.0.6")),
        vnet + packet(h.with_partial_checksum(big, 16), FIX_PARTIAL | FIX_IP),
    )
    train = tcp_train("10.1.0.7", OURS, 1000, 5, last=300)
    gro = datagram(P0, *(packet(s, FIX_L4 | FIX_IP) for s in train), gro=len(train[0]))
    small_train = tcp_train("10.2.0.7", OURS, 40, 30)
    offload_rx = (
        rx(
            gro,
            datagram(P0, packet(udp("10.1.0.7", OURS))),
            datagram(P0, *(packet(s) for s in tcp_train("10.2.0.8", OURS, 500, 3)), gro=540),  # spoofed
        )
        + rx(
            datagram(P1, *(packet(s, FIX_L4 | FIX_IP) for s in small_train[:8]), gro=len(small_train[0])),
            datagram(P1, *(packet(s, FIX_L4 | FIX_IP) for s in small_train[8:16]), gro=len(small_train[0])),
            datagram(P1, *(packet(s, FIX_L4 | FIX_IP) for s in train), gro=len(train[0])),  # spoofed train
        )
    )
    seeds["offload"] = header(OFFLOAD | GSO, MESH) + offload_tx + offload_rx
    seeds["offload-fast-csum"] = header(OFFLOAD | GSO | FAST_CSUM, MESH) + offload_tx + offload_rx
    seeds["offload-fast-csum-portable"] = (
        header(OFFLOAD | GSO | FAST_CSUM | NO_SIMD, MESH) + offload_tx + offload_rx
    )
    seeds["offload-faults"] = (
        header(OFFLOAD | GSO | SMALL_TUN_BUFFER, MESH, batch=8)
        + bytes([FAULT, 2])  # EIO: UDP GSO refused
        + offload_tx
        + bytes([FAULT, 0x82])  # the next sendmmsg sends 2 messages
        + offload_tx
        + offload_rx
    )
    seeds["offload-routes"] = (
        header(OFFLOAD, MESH[:2], max_routes=4)
        + offload_rx
        + bytes([ROUTES, 0x21])  # remove one, add two
        + route("10.1.0.0/16")
        + route("10.1.0.0/17", P1)
        + route("0.0.0.0/0", P3)
        + bytes([GROW, 40])
        + offload_tx
        + offload_rx
    )
    # USO: UDP trains read from the TUN (GSO_UDP_L4; partial, complete or no checksum) and
    # runs of one flow's datagrams received, in one UDP_GRO buffer or apart.
    whole = udp_train(OURS, "10.1.0.5", 2400, 1)[0]
    uso_vnet = VnetHdr(h.VNET_F_NEEDS_CSUM, h.GSO_UDP_L4, 28, 700, 20, 6).pack()
    bare_vnet = VnetHdr(0, h.GSO_UDP_L4, 28, 500, 0, 0).pack()
    no_sum = whole[:26] + b"\0\0" + whole[28:]
    uso_tx = tx(
        uso_vnet + packet(h.with_partial_checksum(whole, 6), FIX_PARTIAL | FIX_IP),
        bare_vnet + packet(whole),
        bare_vnet + packet(no_sum),
        plain_vnet + packet(udp(OURS, "10.1.0.6")),
        uso_vnet + packet(udp(OURS, "10.3.0.5", size=5000, df=True), FIX_PARTIAL | FIX_IP),  # too big
    )
    flow = udp_train("10.1.0.7", OURS, 600, 6, last=200)
    uso_rx = rx(
        datagram(P0, *(packet(d, FIX_L4 | FIX_IP) for d in flow), gro=len(flow[0])),
        datagram(P0, packet(flow[0])),
        datagram(P0, packet(flow[1])),
        datagram(P0, *(packet(s, FIX_L4 | FIX_IP) for s in train), gro=len(train[0])),
        datagram(P0, *(packet(d) for d in udp_train("10.2.0.7", OURS, 100, 4)), gro=128),  # spoofed
    )
    seeds["offload-uso"] = header(OFFLOAD | GSO | USO, MESH) + uso_tx + uso_rx + offload_rx + uso_tx
    seeds["offload-no-uso"] = header(OFFLOAD | GSO, MESH) + uso_tx + uso_rx
    return seeds


def routes_seeds() -> dict[str, bytes]:
    """fuzz_routes.c: max_routes, then operations (see the harness)."""
    add, delete, update, set_, resize, probe = range(6)

    def r(net: str, peer: int = 0) -> bytes:
        n = IPv4Network(net)
        return struct.pack("<IBB", int(n.network_address), n.prefixlen, peer)

    seeds = {}
    seeds["basic"] = (
        bytes([7])
        + bytes([add])
        + r("10.0.0.0/8", 1)
        + bytes([add])
        + r("10.1.0.0/16", 2)
        + bytes([add])
        + r("10.1.2.3/32", 1)
        + bytes([add])
        + r("0.0.0.0/0", 3)
        + bytes([probe])
        + struct.pack("<I", int(IPv4Address("10.1.2.3")))
        + bytes([delete])
        + r("10.1.0.0/16")
        + bytes([update, 0x32])
        + r("10.0.0.0/8")
        + r("10.9.0.0/16")
        + r("10.0.0.0/8", 2)
        + r("10.5.0.0/16", 2)
        + r("10.6.0.0/16", 1)
        + bytes([resize, 20])
        + bytes([set_, 3])
        + r("10.1.0.0/16", 1)
        + r("10.2.0.0/16", 1)
        + r("10.3.0.0/24", 2)
    )
    many = b"".join(bytes([add]) + r(f"10.{i}.0.0/16", i % 4) for i in range(40))
    seeds["grow"] = bytes([3]) + many + bytes([resize, 200]) + many
    return seeds


def write(target: str, seeds: dict[str, bytes]) -> None:
    folder = HERE / "corpus" / target
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("seed-*"):
        old.unlink()
    for name, data in seeds.items():
        digest = hashlib.sha1(data).hexdigest()[:8]
        (folder / f"seed-{name}-{digest}").write_bytes(data)


def main() -> None:
    write("packets", packets_seeds())
    write("routes", routes_seeds())


if __name__ == "__main__":
    main()
