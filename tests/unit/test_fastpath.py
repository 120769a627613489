"""The C fast path against its pure-Python twin, over loopback sockets.

No root needed: an AF_UNIX SOCK_DGRAM socketpair stands in for the TUN (one
read() is one packet, like IFF_TUN|IFF_NO_PI), and the peers are UDP sockets
bound to 127.0.0.2, 127.0.0.3, ... all on the same port as ours (127.0.0.1),
since the fast path knows peers by address and gives them all one port.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import packets as h
from tunproxy.counters import DROP_REASONS
from tunproxy.fastpath import Counters, FastPath, FastPathError, ffi, lib

LOCAL = IPv4Address("10.244.0.0")
MTU = 1400
P2, P3, P4 = (IPv4Address(f"127.0.0.{i}") for i in (2, 3, 4))
NET = IPv4Network
HYPO = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def udp_socket(addr: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    s.bind((addr, port))
    s.setblocking(False)
    return s


class Env:
    """A FastPath wired to a fake TUN and loopback peers P2, P3, P4."""

    def __init__(self, **kw):
        kw.setdefault("mtu", MTU)
        kw.setdefault("local_addr", LOCAL)
        kw.setdefault("icmp_burst", 1_000_000)
        self.socks: list[socket.socket] = []
        for _ in range(20):
            try:
                self.udp = udp_socket("127.0.0.1", 0)
                self.port = self.udp.getsockname()[1]
                self.socks.append(self.udp)
                self.peers = {p: udp_socket(str(p), self.port) for p in (P2, P3, P4)}
                break
            except OSError as e:  # someone holds that port on 127.0.0.x
                if e.errno != errno.EADDRINUSE:
                    raise
                self.close()
        else:
            raise RuntimeError("no free port")
        self.socks += self.peers.values()
        self.kernel, self.tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in (self.kernel, self.tun):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            s.setblocking(False)
            self.socks.append(s)
        self.fp = FastPath(port=self.port, **kw)
        self.now = 0

    def close(self) -> None:
        for s in self.socks:
            s.close()
        self.socks = []

    # moving packets
    def inject(self, *packets: bytes) -> None:
        """The kernel writes packets into the TUN."""
        for p in packets:
            self.kernel.send(p)

    def tx(self) -> int:
        return self.fp.tun_to_udp(self.tun.fileno(), self.udp.fileno(), self.now)

    def send_from(self, peer: IPv4Address, *datagrams: bytes, port: int | None = None) -> None:
        sock = self.peers[peer]
        for d in datagrams:
            sock.sendto(d, ("127.0.0.1", self.port if port is None else port))
        wait_readable(self.udp)

    def rx(self) -> int:
        return self.fp.udp_to_tun(self.udp.fileno(), self.tun.fileno(), self.now)

    def counters(self) -> Counters:
        return self.fp.counters()


def wait_readable(sock: socket.socket, timeout: float = 2.0) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


def receive(sock: socket.socket, count: int | None = None, timeout: float = 2.0) -> list[bytes]:
    """Datagrams waiting on sock: exactly `count` of them (waiting up to
    `timeout`), or, with count None, whatever arrives within a short grace."""
    out: list[bytes] = []
    deadline = time.monotonic() + (timeout if count is not None else 0.05)
    while count is None or len(out) < count:
        left = deadline - time.monotonic()
        if left <= 0 or not wait_readable(sock, left):
            break
        try:
            while True:
                out.append(sock.recv(70000))
        except BlockingIOError:
            pass
    if count is not None:
        assert len(out) == count, f"wanted {count} datagrams, got {len(out)}"
    return out


@pytest.fixture
def env():
    e = Env()
    yield e
    e.close()


@pytest.fixture
def make_env():
    made: list[Env] = []

    def make(**kw) -> Env:
        made.append(Env(**kw))
        return made[-1]

    yield make
    for e in made:
        e.close()


# ---- packet strategies ----

special_addrs = st.sampled_from([0, 0xDFFFFFFF, 0xE0000000, 0xEFFFFFFA, 0xF0000001, 0xFFFFFFFF])
addrs = st.integers(1, 0xDFFFFFFF) | special_addrs


@st.composite
def packets(draw, *, min_ttl: int = 2, max_len: int = MTU, icmp_errors: bool = False) -> bytes:
    """Valid IPv4 packets (with random trailing bytes past the total length)."""
    options = draw(st.binary(max_size=40))
    options = options[: len(options) // 4 * 4]
    proto = draw(st.sampled_from([1, 6, 17]) | st.integers(0, 255))
    payload = draw(st.binary(max_size=min(max_len - 20 - len(options), 300)))
    if proto == 1 and payload and icmp_errors:
        icmp_type = draw(st.sampled_from([0, 3, 4, 5, 8, 11, 12, 13]))
        payload = bytes([icmp_type]) + payload[1:]
    frag = draw(st.just(0) | st.integers(0, 0x1FFF))
    packet = h.build_ipv4(
        src=draw(addrs if icmp_errors else st.integers(1, 0xDFFFFFFF)),
        dst=draw(addrs if icmp_errors else st.integers(0, 0xFFFFFFFF)),
        payload=payload,
        proto=proto,
        ttl=draw(st.integers(min_ttl, 255)),
        ident=draw(st.integers(0, 0xFFFF)),
        tos=draw(st.integers(0, 255)),
        df=draw(st.booleans()),
        mf=draw(st.booleans()),
        frag_offset=frag,
        options=options,
    )
    return packet + draw(st.binary(max_size=16))


def udp(src: str, dst: str, size: int = 8, **kw) -> bytes:
    return h.build_ipv4(src=src, dst=dst, payload=bytes(range(size)), **kw)


# ---- the header rewrite, both directions ----


@HYPO
@given(packet=packets())
def test_tx_rewrite_matches_python_twin(env, packet):
    env.fp.set_routes({NET("0.0.0.0/0"): P2})
    before = env.counters()
    env.inject(packet)
    assert env.tx() == 1
    [sent] = receive(env.peers[P2], 1)
    assert sent == h.forward(packet)
    assert h.checksum(sent[: (sent[0] & 15) * 4]) == 0
    after = env.counters()
    assert after.tx_packets == before.tx_packets + 1
    assert after.tx_bytes == before.tx_bytes + len(sent)
    assert after.peers[P2].tx_packets == before.peers[P2].tx_packets + 1


# The checksums where RFC 1624's update wraps: ttl_dec adds ~HC + 0xFEFF (~m + m' for a TTL
# decrement), so HC <= 0xFEFE carries out of 16 bits and 0xFEFF, 0xFF00 and up do not; 0x0000
# and 0x0001 sit at the bottom of the fold. Reached by construction, not left to chance.
WRAP_CHECKSUMS = [0x0000, 0x0001, 0x00FF, 0x0100, 0xFEFD, 0xFEFE, 0xFEFF, 0xFF00, 0xFF01, 0xFFFE]


def _with_checksum(target: int, ttl: int, src: str, dst: str) -> bytes:
    """A valid IPv4 packet whose header checksum field is ``target``: the ID is chosen to get it."""
    fields = dict(src=src, dst=dst, payload=b"wrap", ttl=ttl, df=True)
    base = int.from_bytes(h.build_ipv4(ident=0, **fields)[10:12], "big")
    total = (~target & 0xFFFF) + base  # the ID adds this to the one's complement sum
    ident = (total & 0xFFFF) + (total >> 16)
    packet = h.build_ipv4(ident=ident, **fields)
    assert int.from_bytes(packet[10:12], "big") == target, (hex(target), packet[10:12].hex())
    return packet


@pytest.mark.parametrize("ttl", [2, 64, 255])
@pytest.mark.parametrize("target", WRAP_CHECKSUMS, ids=[f"{c:#06x}" for c in WRAP_CHECKSUMS])
def test_ttl_checksum_wrap_matches_python_twin_both_ways(env, target, ttl):
    env.fp.set_routes({NET("10.2.0.0/16"): P2, NET("10.9.0.0/16"): P3})
    out = _with_checksum(target, ttl, "10.9.0.1", "10.2.0.5")
    env.inject(out)
    assert env.tx() == 1
    [sent] = receive(env.peers[P2], 1)
    assert sent == h.forward(out)
    assert h.checksum(sent[:20]) == 0
    back = _with_checksum(target, ttl, "10.2.0.5", "10.9.0.1")
    env.send_from(P2, back)
    assert env.rx() == 1
    [written] = receive(env.kernel, 1)
    assert written == h.forward(back)
    assert h.checksum(written[:20]) == 0


@HYPO
@given(packet=packets())
def test_rx_rewrite_matches_python_twin(env, packet):
    env.fp.set_routes({NET("0.0.0.0/0"): P3})  # every source is P3's: the rewrite alone
    before = env.counters()
    env.send_from(P3, packet)
    assert env.rx() == 1
    [written] = receive(env.kernel, 1)
    assert written == h.forward(packet)
    after = env.counters()
    assert after.rx_packets == before.rx_packets + 1
    assert after.rx_bytes == before.rx_bytes + len(written)
    assert after.peers[P3].rx_bytes == before.peers[P3].rx_bytes + len(written)


# ---- longest prefix match ----


@st.composite
def route_tables(draw, max_size: int = 40) -> dict[IPv4Network, IPv4Address]:
    peers = st.sampled_from([P2, P3, P4, IPv4Address("192.0.2.9")])
    entries = draw(
        st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32), peers), max_size=max_size)
    )
    return {IPv4Network((a, n), strict=False): p for a, n, p in entries}


def brute_force(table: dict[IPv4Network, IPv4Address], addr: IPv4Address) -> IPv4Address | None:
    best = None
    for net, peer in table.items():
        if addr in net and (best is None or net.prefixlen > best[0].prefixlen):
            best = (net, peer)
    return best[1] if best else None


def probes(table: dict[IPv4Network, IPv4Address], data) -> list[IPv4Address]:
    """Addresses worth asking about: random ones and ones inside, at the
    edges of, and just outside each prefix."""
    out = [IPv4Address(a) for a in data.draw(st.lists(st.integers(0, 2**32 - 1), max_size=10))]
    for net in table:
        lo, hi = int(net.network_address), int(net.broadcast_address)
        out += [IPv4Address(x) for x in (lo, hi, (lo + hi) // 2) if 0 <= x < 2**32]
        out += [IPv4Address(x) for x in (lo - 1, hi + 1) if 0 <= x < 2**32]
    return out


@settings(max_examples=200, deadline=None)
@given(table=route_tables(), data=st.data())
def test_lookup_matches_brute_force(table, data):
    fp = FastPath(mtu=MTU, local_addr=LOCAL, batch=1, max_routes=64)
    fp.set_routes(table)
    assert fp.routes() == table
    assert list(fp.routes()) == sorted(table, key=lambda n: (-n.prefixlen, n.network_address))
    for addr in probes(table, data):
        assert fp.lookup(addr) == brute_force(table, addr), addr


ops = st.one_of(
    st.tuples(st.just("add"), route_tables(max_size=1)),
    st.tuples(st.just("remove"), route_tables(max_size=1)),
    st.tuples(st.just("set"), route_tables(max_size=12)),
)


@settings(max_examples=100, deadline=None)
@given(steps=st.lists(ops, max_size=25), data=st.data())
def test_route_changes_match_a_dict(steps, data):
    fp = FastPath(mtu=MTU, local_addr=LOCAL, batch=1, max_routes=16)
    model: dict[IPv4Network, IPv4Address] = {}
    for op, table in steps:
        if op == "set":
            fp.set_routes(table)
            model = dict(table)
        for net, peer in table.items() if op != "set" else ():
            # Half the removals aim at a route that exists.
            if op == "remove" and model and data.draw(st.booleans()):
                net = data.draw(st.sampled_from(sorted(model)))
            if op == "add":
                if net not in model and len(model) == 16:
                    with pytest.raises(FastPathError) as e:
                        fp.add_route(net, peer)
                    assert e.value.errno == errno.ENOSPC
                    continue
                fp.add_route(net, peer)
                model[net] = peer
            elif net in model:
                fp.remove_route(net)
                del model[net]
            else:
                with pytest.raises(KeyError):
                    fp.remove_route(net)
        assert fp.routes() == model
        assert set(fp.counters().peers) == set(model.values())
        for addr in probes(model, data):
            assert fp.lookup(addr) == brute_force(model, addr)


def test_route_edge_cases():
    fp = FastPath(mtu=MTU, local_addr=LOCAL, max_routes=4)
    assert fp.lookup("1.2.3.4") is None
    fp.add_route(NET("0.0.0.0/0"), P2)
    fp.add_route(NET("10.1.2.3/32"), P3)
    fp.add_route("10.0.0.0/8", "127.0.0.4")
    assert fp.lookup("10.1.2.3") == P3
    assert fp.lookup("10.1.2.4") == P4
    assert fp.lookup("11.0.0.0") == P2
    assert fp.lookup("255.255.255.255") == P2
    fp.add_route(NET("10.0.0.0/8"), P2)  # replace the next hop
    assert fp.routes()[NET("10.0.0.0/8")] == P2 and len(fp.routes()) == 3
    fp.add_route(NET("10.1.2.4/32"), P3)
    with pytest.raises(FastPathError) as e:
        fp.add_route(NET("10.1.2.5/32"), P3)
    assert e.value.errno == errno.ENOSPC
    fp.add_route(NET("10.1.2.4/32"), P4)  # replacing works when full
    with pytest.raises(KeyError):
        fp.remove_route(NET("10.1.0.0/16"))
    fp.remove_route(NET("0.0.0.0/0"))
    assert fp.lookup("11.0.0.0") is None
    table = fp.routes()
    with pytest.raises(FastPathError) as e:
        fp.set_routes({NET(f"10.{i}.0.0/16"): P2 for i in range(5)})
    assert e.value.errno == errno.ENOSPC
    assert fp.routes() == table  # untouched
    fp.set_routes({})
    assert fp.routes() == {} and fp.lookup("10.1.2.3") is None


def test_route_argument_errors():
    fp = FastPath(mtu=MTU, local_addr=LOCAL)
    with pytest.raises(ValueError, match="host bits"):
        fp.add_route("10.0.0.1/8", P2)
    with pytest.raises(ValueError, match="not a unicast"):
        fp.add_route(NET("10.0.0.0/8"), IPv4Address("0.0.0.0"))
    with pytest.raises(ValueError, match="not a unicast"):
        fp.set_routes({NET("10.0.0.0/8"): IPv4Address("224.0.0.1")})
    with pytest.raises(TypeError):
        fp.add_route(42, P2)
    with pytest.raises(ValueError, match="bad peer"):
        fp.add_route(NET("10.0.0.0/8"), "nope")
    assert fp.routes() == {}


def test_c_rejects_bad_routes():
    """The C checks its own arguments too (-errno, table untouched)."""
    fp = FastPath(mtu=MTU, local_addr=LOCAL, max_routes=4)
    fp.add_route(NET("10.0.0.0/8"), P2)
    ctx = fp._ctx
    a = int(IPv4Address("10.1.0.0"))
    assert lib.fp_add_route(ctx, a, 8, int(P2)) == -errno.EINVAL  # host bits
    assert lib.fp_add_route(ctx, a, 33, int(P2)) == -errno.EINVAL
    assert lib.fp_add_route(ctx, a, 16, 0) == -errno.EINVAL
    assert lib.fp_del_route(ctx, a, 8) == -errno.EINVAL
    assert lib.fp_del_route(ctx, a, 16) == -errno.ENOENT
    dup = ffi.new("struct fp_route[]", 2)
    for r in dup:
        r.prefix, r.len, r.peer = a, 16, int(P3)
    assert lib.fp_set_routes(ctx, dup, 2) == -errno.EINVAL
    assert lib.fp_set_routes(ctx, dup, 5) == -errno.ENOSPC
    assert fp.routes() == {NET("10.0.0.0/8"): P2}


# ---- forwarding decisions ----


def test_routes_pick_the_peer(env):
    env.fp.set_routes({NET("10.0.0.0/8"): P2, NET("10.1.0.0/16"): P3, NET("10.1.2.3/32"): P2})
    a, b, c = udp("10.9.0.1", "10.1.2.3"), udp("10.9.0.1", "10.1.9.9"), udp("10.9.0.1", "10.7.0.1")
    env.inject(a, b, c)
    assert env.tx() == 3
    assert receive(env.peers[P2], 2) == [h.forward(a), h.forward(c)]
    assert receive(env.peers[P3], 1) == [h.forward(b)]
    peers = env.counters().peers
    assert peers[P2].tx_packets == 2 and peers[P3].tx_packets == 1
    assert peers[P2].tx_bytes == len(a) + len(c)


def test_no_route_sends_net_unreachable(env):
    env.fp.set_routes({NET("10.1.0.0/16"): P2})
    packet = udp("10.244.1.7", "10.2.0.5", size=40)
    env.inject(packet)
    assert env.tx() == 1
    [msg] = receive(env.kernel, 1)
    assert msg == h.icmp_net_unreachable(packet, LOCAL)
    assert (msg[20], msg[21]) == (3, 0)
    assert msg[28:] == packet[:28]
    assert receive(env.peers[P2]) == []
    c = env.counters()
    assert c.drops["no_route"] == 1 and c.icmp_sent == 1 and c.tx_packets == 0


def icmp(icmp_type: int, **kw) -> bytes:
    return h.build_ipv4(
        src="10.9.0.1", dst="10.2.0.5", proto=1, payload=bytes([icmp_type, 1]) + bytes(30), **kw
    )


SILENT = {
    "icmp-unreachable": icmp(3),
    "icmp-source-quench": icmp(4),
    "icmp-redirect": icmp(5),
    "icmp-time-exceeded": icmp(11),
    "icmp-parameter-problem": icmp(12),
    "icmp-no-type": h.build_ipv4(src="10.9.0.1", dst="10.2.0.5", proto=1),
    "non-first-fragment": h.build_ipv4(src="10.9.0.1", dst="10.2.0.5", frag_offset=185, payload=bytes(20)),
    "fragment-offset-4096": h.build_ipv4(src="10.9.0.1", dst="10.2.0.5", frag_offset=0x1000, mf=True),
    "icmp-echo-fragment": icmp(8, frag_offset=1),
    "multicast-dst": h.build_ipv4(src="10.9.0.1", dst="224.0.0.251", payload=bytes(20)),
    "multicast-dst-edge": h.build_ipv4(src="10.9.0.1", dst="224.0.0.0"),
    "broadcast-dst": h.build_ipv4(src="10.9.0.1", dst="255.255.255.255"),
    "multicast-src": h.build_ipv4(src="239.1.1.1", dst="10.2.0.5"),
    "zero-src": h.build_ipv4(src="0.0.0.0", dst="10.2.0.5"),
}


@pytest.mark.parametrize("packet", SILENT.values(), ids=SILENT.keys())
def test_no_route_is_silent_for(env, packet):
    env.inject(packet)
    assert env.tx() == 1
    assert receive(env.kernel) == []
    assert env.counters().drops["no_route"] == 1 and env.counters().icmp_sent == 0


@HYPO
@given(packet=packets(icmp_errors=True))
def test_no_route_icmp_matches_python_twin(env, packet):
    """With no routes, the C answers exactly when and how the twin says."""
    env.inject(packet)
    assert env.tx() == 1
    expected = [h.icmp_net_unreachable(packet, LOCAL)] if h.icmp_error_due(packet) else []
    assert receive(env.kernel, len(expected) or None) == expected


def test_icmp_rate_limit(make_env):
    env = make_env(icmp_rate=10, icmp_burst=5)

    def burst(n: int) -> int:
        env.inject(*(udp("10.9.0.1", f"10.2.0.{i}") for i in range(n)))
        assert env.tx() == n
        return len(receive(env.kernel))

    env.now = 1000
    assert burst(8) == 5
    assert env.counters().icmp_ratelimited == 3
    assert burst(3) == 0  # same instant: bucket empty
    env.now = 1100  # 100 ms at 10/s: one token
    assert burst(3) == 1
    env.now = 1150  # half a token
    assert burst(2) == 0
    env.now = 1200
    assert burst(2) == 1
    env.now = 60_000  # a long pause refills only up to the burst
    assert burst(9) == 5
    c = env.counters()
    assert c.icmp_sent == 12 and c.icmp_ratelimited == 27 - 12
    assert c.drops["no_route"] == 27


def _silent_kinds(*, ttl: int = 64, df: bool = False, size: int = 0) -> dict[str, bytes]:
    """SILENT's kinds of packet (no ICMP error may be sent about them) with a given TTL, DF and payload."""
    pad = bytes(size)

    def ip(src: str = "10.9.0.1", dst: str = "10.2.0.5", payload: bytes = pad, **kw) -> bytes:
        return h.build_ipv4(src=src, dst=dst, payload=payload, ttl=ttl, df=df, **kw)

    def icmp_kind(icmp_type: int, **kw) -> bytes:
        return ip(proto=1, payload=bytes([icmp_type, 1]) + bytes(30) + pad, **kw)

    return {
        "icmp-unreachable": icmp_kind(3),
        "icmp-source-quench": icmp_kind(4),
        "icmp-redirect": icmp_kind(5),
        "icmp-time-exceeded": icmp_kind(11),
        "icmp-parameter-problem": icmp_kind(12),
        "non-first-fragment": ip(frag_offset=185, payload=bytes(20) + pad),
        "fragment-offset-4096": ip(frag_offset=0x1000, mf=True),
        "icmp-echo-fragment": icmp_kind(8, frag_offset=1),
        "multicast-dst": ip(dst="224.0.0.251", payload=bytes(20) + pad),
        "multicast-dst-edge": ip(dst="224.0.0.0"),
        "broadcast-dst": ip(dst="255.255.255.255"),
        "multicast-src": ip(src="239.1.1.1"),
        "zero-src": ip(src="0.0.0.0"),
    }


@pytest.mark.parametrize("kind", list(_silent_kinds()))
def test_ttl_expiry_is_silent_for(env, kind):
    """Time-exceeded obeys the same rules as net-unreachable (RFC 1812 4.3.2.7)."""
    env.fp.set_routes({NET("0.0.0.0/0"): P2})
    packet = _silent_kinds(ttl=1)[kind]
    env.inject(packet)
    assert env.tx() == 1
    assert receive(env.kernel) == [] and receive(env.peers[P2]) == []
    c = env.counters()
    assert c.drops["ttl"] == 1 and c.icmp_sent == 0 and c.tx_packets == 0


@pytest.mark.parametrize("kind", list(_silent_kinds()))
def test_frag_needed_is_silent_for(env, kind):
    """Frag-needed obeys the same rules too: a DF packet over the MTU about which no error is due."""
    env.fp.set_routes({NET("0.0.0.0/0"): P2})
    packet = _silent_kinds(df=True, size=MTU)[kind]
    assert len(packet) > MTU
    env.inject(packet)
    assert env.tx() == 1
    assert receive(env.kernel) == [] and receive(env.peers[P2]) == []
    c = env.counters()
    assert c.drops["too_big"] == 1 and c.icmp_sent == 0 and c.tx_packets == 0


def _expiring(i: int) -> bytes:
    return udp("10.9.0.1", f"10.2.0.{i}", ttl=1)


def _too_big(i: int) -> bytes:
    return h.build_ipv4(src="10.9.0.1", dst=f"10.2.0.{i}", payload=bytes(MTU), df=True)


@pytest.mark.parametrize(
    ("make", "drop", "answer"),
    [
        (_expiring, "ttl", lambda p: h.icmp_time_exceeded(p, LOCAL)),
        (_too_big, "too_big", lambda p: h.icmp_frag_needed(p, LOCAL, MTU)),
    ],
    ids=["time-exceeded", "frag-needed"],
)
def test_icmp_rate_limit_covers(make_env, make, drop, answer):
    """One token bucket limits every ICMP error, not only net-unreachable."""
    env = make_env(icmp_rate=10, icmp_burst=5)
    env.fp.set_routes({NET("0.0.0.0/0"): P2})

    def burst(n: int) -> list[bytes]:
        packets = [make(i) for i in range(n)]
        env.inject(*packets)
        assert env.tx() == n
        got = receive(env.kernel)
        assert got == [answer(p) for p in packets[: len(got)]]  # the first ones, in order
        return got

    env.now = 1000
    assert len(burst(8)) == 5
    assert env.counters().icmp_ratelimited == 3
    assert burst(3) == []  # same instant: the bucket is empty
    env.now = 1100  # 100 ms at 10/s: one token
    assert len(burst(3)) == 1
    env.now = 60_000  # a long pause refills only up to the burst
    assert len(burst(9)) == 5
    c = env.counters()
    assert c.icmp_sent == 11 and c.icmp_ratelimited == 23 - 11
    assert c.drops[drop] == 23 and c.tx_packets == 0


def test_ttl_expiry_towards_a_peer(env):
    env.fp.set_routes({NET("10.0.0.0/8"): P2})
    one, zero = udp("10.9.0.1", "10.2.0.5", ttl=1), udp("10.9.0.1", "10.2.0.6", ttl=0)
    env.inject(one, zero)
    assert env.tx() == 2
    got = receive(env.kernel, 2)
    assert got == [h.icmp_time_exceeded(one, LOCAL), h.icmp_time_exceeded(zero, LOCAL)]
    assert (got[0][20], got[0][21]) == (11, 0)
    assert receive(env.peers[P2]) == []
    assert env.counters().drops["ttl"] == 2


def test_ttl_expiry_from_a_peer_goes_back_over_udp(env):
    env.fp.set_routes({NET("10.0.0.0/8"): P2})
    packet = udp("10.5.0.1", "10.244.0.9", ttl=1, size=30)
    env.send_from(P2, packet)
    assert env.rx() == 1
    [back] = receive(env.peers[P2], 1)
    assert back == h.icmp_time_exceeded(packet, LOCAL)
    assert h.parse_ipv4(back).dst == IPv4Address("10.5.0.1")
    assert receive(env.kernel) == []
    c = env.counters()
    assert c.drops["ttl"] == 1 and c.icmp_sent == 1 and c.rx_packets == 0


def test_too_big_with_df_gets_frag_needed(env):
    env.fp.set_routes({NET("10.0.0.0/8"): P2})
    big_df = h.build_ipv4(src="10.9.0.1", dst="10.2.0.5", payload=bytes(MTU - 19), df=True)
    big = h.build_ipv4(src="10.9.0.1", dst="10.2.0.5", payload=bytes(MTU - 19))
    fits_df = h.build_ipv4(src="10.9.0.1", dst="10.2.0.5", payload=bytes(MTU - 20), df=True)
    env.inject(big_df, big, fits_df)
    assert env.tx() == 3
    [msg] = receive(env.kernel, 1)
    assert msg == h.icmp_frag_needed(big_df, LOCAL, MTU)
    assert (msg[20], msg[21], int.from_bytes(msg[26:28], "big")) == (3, 4, MTU)
    # Without DF the kernel fragments the outer datagram; at the MTU it fits.
    assert receive(env.peers[P2], 2) == [h.forward(big), h.forward(fits_df)]
    assert env.counters().drops["too_big"] == 1


def test_small_slots_truncate_safely(make_env):
    env = make_env(headroom=16, slot_size=16 + MTU)
    env.fp.set_routes({NET("10.0.0.0/8"): P2})
    huge = h.build_ipv4(src="10.9.0.1", dst="10.2.0.5", payload=bytes(MTU + 100))
    env.inject(huge)
    assert env.tx() == 1  # read() cut it short: the total length no longer fits
    env.send_from(P2, huge)
    assert env.rx() == 1  # MSG_TRUNC
    c = env.counters()
    assert c.drops["malformed"] == 1 and c.drops["too_big"] == 1
    assert c.tx_packets == c.rx_packets == 0


# ---- bad input ----


@HYPO
@given(data=st.binary(max_size=2000))
def test_garbage_from_tun(env, data):
    env.fp.set_routes({NET("0.0.0.0/0"): P2})
    before = env.counters()
    env.inject(data)
    assert env.tx() == 1
    try:
        h.parse_ipv4(data)
    except h.MalformedPacket:
        assert env.counters().drops["malformed"] == before.drops["malformed"] + 1
        assert receive(env.peers[P2]) == []
    else:  # astronomically rare: it is a packet
        receive(env.peers[P2])
        receive(env.kernel)


@HYPO
@given(data=st.binary(max_size=2000))
def test_garbage_from_peer(env, data):
    env.fp.set_routes({NET("0.0.0.0/0"): P2})
    before = env.counters()
    env.send_from(P2, data)
    assert env.rx() == 1
    try:
        h.parse_ipv4(data)
    except h.MalformedPacket:
        assert env.counters().drops["malformed"] == before.drops["malformed"] + 1
        assert receive(env.kernel) == []
    else:
        receive(env.kernel)
        receive(env.peers[P2])


def test_malformed_lengths_both_ways(env):
    env.fp.set_routes({NET("0.0.0.0/0"): P2})
    good = udp("10.9.0.1", "10.2.0.5", size=20)
    bad = [
        b"",
        good[:19],
        good[:-1],  # total length > bytes
        h.build_ipv4(src="10.9.0.1", dst="10.2.0.5", total_length=19),
        bytes([0x46]) + good[1:],  # IHL 6, checksum now wrong
        good[:10] + b"\0\0" + good[12:],  # checksum zeroed
        bytes([0x65]) + good[1:],
    ]
    env.inject(*bad)
    assert env.tx() == len(bad)
    env.send_from(P2, *bad)
    time.sleep(0.05)
    assert env.rx() == len(bad)
    assert env.counters().drops["malformed"] == 2 * len(bad)
    assert receive(env.peers[P2]) == [] and receive(env.kernel) == []


def test_unknown_peers_are_dropped(env):
    env.fp.set_routes({NET("10.0.0.0/8"): P2})
    packet = udp("10.5.0.1", "10.244.0.9")
    env.send_from(P3, packet)  # a socket on the right port, but not a next hop
    time.sleep(0.05)
    assert env.rx() == 1
    assert receive(env.kernel) == []
    c = env.counters()
    assert c.drops["unknown_peer"] == 1 and c.rx_packets == 0
    env.send_from(P2, packet)
    assert env.rx() == 1 and receive(env.kernel, 1) == [h.forward(packet)]
    # A peer is known by its address alone: any source port (socat, NAT) is accepted.
    any_port = udp_socket(str(P2), 0)
    env.socks.append(any_port)
    any_port.sendto(packet, ("127.0.0.1", env.port))
    time.sleep(0.05)
    assert env.rx() == 1 and receive(env.kernel, 1) == [h.forward(packet)]


# ---- anti-spoofing ----

SPOOF_ROUTES = {NET("10.1.0.0/16"): P2, NET("10.2.0.0/16"): P3, NET("10.2.9.0/24"): P2}


def test_spoofed_sources_are_dropped_and_counted(env):
    env.fp.set_routes(SPOOF_ROUTES)
    legit = [
        udp("10.1.0.5", "10.244.0.9"),
        udp("10.2.9.1", "10.244.0.9"),  # P3's /16, but the longer /24 is P2's
        h.icmp_net_unreachable(udp("10.244.0.9", "10.3.0.1"), "10.1.0.0"),  # from P2's tunnel address
    ]
    spoofed = [
        udp("10.2.0.5", "10.244.0.9"),  # P3's subnet
        udp("192.168.1.1", "10.244.0.9"),  # nobody's
        udp("10.244.0.7", "10.244.0.9"),  # ours
        udp("10.2.0.5", "10.244.0.9", ttl=1),  # no ICMP error goes back to a forged source
    ]
    before = env.counters()
    env.send_from(P2, spoofed[0], legit[0], *spoofed[1:], *legit[1:])
    time.sleep(0.05)
    assert env.rx() == len(legit) + len(spoofed)
    assert receive(env.kernel, len(legit)) == [h.forward(p) for p in legit]
    assert receive(env.kernel) == [] and receive(env.peers[P2]) == []
    after = env.counters()
    assert after.drops["spoofed"] - before.drops["spoofed"] == len(spoofed)
    assert after.rx_packets - before.rx_packets == len(legit) == after.peers[P2].rx_packets
    assert sum(after.drops.values()) - sum(before.drops.values()) == len(spoofed)
    assert after.icmp_sent == before.icmp_sent


def test_allow_any_source_lets_foreign_sources_through(make_env):
    env = make_env(allow_any_source=True)
    env.fp.set_routes(SPOOF_ROUTES)
    packets = [udp("10.2.0.5", "10.244.0.9"), udp("192.168.1.1", "10.244.0.9")]
    env.send_from(P2, *packets)
    time.sleep(0.05)
    assert env.rx() == 2
    assert receive(env.kernel, 2) == [h.forward(p) for p in packets]
    assert env.counters().drops["spoofed"] == 0


@HYPO
@given(table=route_tables(max_size=12), data=st.data())
def test_source_check_matches_brute_force(env, table, data):
    """A packet from peer P is delivered exactly when the longest match of its
    source is a route to P (the twin: brute_force over the same table)."""
    table = {net: peer for net, peer in table.items() if peer in env.peers}
    sender = data.draw(st.sampled_from(sorted(env.peers)))
    if sender not in table.values():
        table[NET("172.16.0.0/12")] = sender
    env.fp.set_routes(table)
    sources = data.draw(st.lists(st.sampled_from(probes(table, data)), min_size=1, max_size=40))
    packets = [udp(str(src), "10.244.0.9", ident=i) for i, src in enumerate(sources)]
    owned = [brute_force(table, src) == sender for src in sources]
    expected = [h.forward(p) for p, ok in zip(packets, owned, strict=True) if ok]
    before = env.counters()
    env.send_from(sender, *packets)
    done = 0
    while done < len(packets):
        assert wait_readable(env.udp)
        done += env.rx()
    assert receive(env.kernel, len(expected)) == expected
    assert receive(env.kernel) == []
    after = env.counters()
    assert after.drops["spoofed"] - before.drops["spoofed"] == len(packets) - len(expected)


# ---- batching ----


def test_tun_to_udp_batches(make_env):
    env = make_env(batch=64)
    env.fp.set_routes({NET("10.0.0.0/8"): P2})
    sent = [udp("10.9.0.1", "10.2.0.5", ident=i) for i in range(200)]
    env.inject(*sent)
    assert env.tx() == 64
    c = env.counters()
    assert c.tx_batches >= 1 and c.tx_multi_batches >= 1 and c.tx_max_batch > 1
    assert c.tx_batches <= 2  # one sendmmsg, two if the socket balked
    got = receive(env.peers[P2], 64)
    assert [env.tx(), env.tx(), env.tx(), env.tx()] == [64, 64, 8, 0]
    got += receive(env.peers[P2], 136)
    assert got == [h.forward(p) for p in sent]
    c = env.counters()
    assert c.tx_packets == 200 and c.tx_max_batch == 64 and c.peers[P2].tx_packets == 200


def test_batch_accounting_counts_syscalls(env):
    env.fp.set_routes({NET("10.0.0.0/8"): P2})
    env.inject(udp("10.9.0.1", "10.2.0.5"), udp("10.9.0.1", "10.2.0.6"))
    assert env.tx() == 2
    env.inject(udp("10.9.0.1", "10.2.0.7"))
    assert env.tx() == 1
    receive(env.peers[P2], 3)
    env.send_from(P2, udp("10.2.0.5", "10.9.0.1"), udp("10.2.0.5", "10.9.0.2"))
    time.sleep(0.05)
    assert env.rx() == 2
    env.send_from(P2, udp("10.2.0.5", "10.9.0.3"))
    assert env.rx() == 1
    receive(env.kernel, 3)
    c = env.counters()
    assert (c.tx_batches, c.tx_multi_batches, c.tx_max_batch) == (2, 1, 2)
    assert (c.rx_batches, c.rx_multi_batches, c.rx_max_batch) == (2, 1, 2)


def test_udp_to_tun_batches(make_env):
    env = make_env(batch=64)
    env.fp.set_routes({NET("10.0.0.0/8"): P2})
    sent = [udp("10.5.0.1", "10.244.0.9", ident=i) for i in range(200)]
    env.send_from(P2, *sent)
    time.sleep(0.1)
    n = env.rx()
    assert 1 < n <= 64
    c = env.counters()
    assert c.rx_batches == 1 and c.rx_multi_batches == 1 and c.rx_max_batch == n
    got = receive(env.kernel, n)
    while env.rx():
        got += receive(env.kernel)
    assert got == [h.forward(p) for p in sent][: len(got)]
    c = env.counters()
    assert c.rx_packets == len(got) == c.peers[P2].rx_packets
    assert len(got) == 200  # loopback with a 1 MB buffer drops nothing


# ---- counters ----


def test_peer_counters_survive_a_replace(env):
    env.fp.set_routes({NET("10.1.0.0/16"): P2, NET("10.2.0.0/16"): P3})
    env.inject(udp("10.9.0.1", "10.1.0.1"), udp("10.9.0.1", "10.2.0.1"))
    assert env.tx() == 2
    receive(env.peers[P2], 1), receive(env.peers[P3], 1)
    env.send_from(P3, udp("10.2.0.1", "10.244.0.9"))
    assert env.rx() == 1
    receive(env.kernel, 1)
    env.fp.set_routes({NET("10.1.0.0/16"): P2, NET("10.4.0.0/16"): P4})
    peers = env.counters().peers
    assert set(peers) == {P2, P4}
    assert peers[P2].tx_packets == 1 and peers[P4].tx_packets == 0
    env.fp.add_route(NET("10.2.0.0/16"), P3)  # removed peers start over
    assert env.counters().peers[P3].rx_packets == 0
    env.fp.add_route(NET("10.3.0.0/16"), P2)
    env.fp.remove_route(NET("10.4.0.0/16"))
    assert env.counters().peers[P2].tx_packets == 1
    c = env.counters()
    assert (c.tx_packets, c.rx_packets) == (2, 1)  # totals never reset


def test_write_and_send_failures_are_counted(env):
    env.fp.set_routes({NET("10.0.0.0/8"): P2})
    packet = udp("10.5.0.1", "10.2.0.9")
    env.send_from(P2, packet)
    ro = os.open("/dev/null", os.O_RDONLY)
    try:
        assert env.fp.udp_to_tun(env.udp.fileno(), ro, 0) == 1
    finally:
        os.close(ro)
    assert env.counters().drops["tun_write"] == 1
    r, w = os.pipe()
    try:
        env.inject(packet, packet, packet)
        assert env.fp.tun_to_udp(env.tun.fileno(), w, 0) == 3  # sendmmsg: ENOTSOCK
    finally:
        os.close(r), os.close(w)
    c = env.counters()
    assert c.drops["send"] == 3 and c.tx_packets == 0 and c.tx_batches == 0


def test_a_refused_datagram_does_not_sink_the_batch(env):
    """sendmmsg stops at a datagram the kernel refuses (EMSGSIZE: 65535 bytes
    do not fit in UDP); that one is dropped, the rest still go."""
    env.fp.set_routes({NET("10.0.0.0/8"): P2})
    small = [udp("10.9.0.1", "10.2.0.5", ident=i) for i in range(3)]
    huge = h.build_ipv4(src="10.9.0.1", dst="10.2.0.5", payload=bytes(65535 - 20))
    env.inject(small[0], huge, small[1], small[2])
    assert env.tx() == 4
    assert receive(env.peers[P2], 3) == [h.forward(p) for p in small]
    c = env.counters()
    assert c.drops["send"] == 1 and c.tx_packets == 3 and c.tx_batches == 2


def test_errors_and_nothing_to_do(env):
    assert env.tx() == 0  # EAGAIN
    assert env.rx() == 0
    r, w = os.pipe()
    os.close(r), os.close(w)
    with pytest.raises(FastPathError) as e:
        env.fp.tun_to_udp(r, env.udp.fileno(), 0)
    assert e.value.errno == errno.EBADF
    with pytest.raises(FastPathError) as e:
        env.fp.udp_to_tun(r, env.tun.fileno(), 0)
    assert e.value.errno == errno.EBADF
    assert isinstance(e.value, OSError)


def test_counters_shape_and_summary(env):
    env.fp.set_routes({NET("10.0.0.0/8"): P2})
    env.inject(udp("10.9.0.1", "10.2.0.5", size=100), udp("10.9.0.1", "11.0.0.1"))
    env.tx()
    receive(env.peers[P2], 1)
    c = env.counters()
    assert (
        set(c.drops)
        == set(DROP_REASONS)
        == {"no_route", "ttl", "malformed", "unknown_peer", "too_big", "tun_write", "send", "spoofed"}
    )
    line = c.summary()
    assert "\n" not in line
    assert line.startswith("tx_packets=1 tx_bytes=120 rx_packets=0 rx_bytes=0 ")
    assert "tx_batches=1 tx_multi_batches=0" in line
    assert "no_route=1" in line and "ttl=0" in line
    with pytest.raises(AttributeError):
        c.tx_packets = 5  # frozen


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"mtu": 67}, ValueError, "mtu"),
        ({"mtu": 65536}, ValueError, "mtu"),
        ({"mtu": "1400"}, TypeError, "mtu"),
        ({"batch": 0}, ValueError, "batch"),
        ({"batch": 1025}, ValueError, "batch"),
        ({"port": 0}, ValueError, "port"),
        ({"headroom": -1}, ValueError, "headroom"),
        ({"max_routes": 0}, ValueError, "max_routes"),
        ({"icmp_rate": -1}, ValueError, "icmp_rate"),
        ({"icmp_burst": True}, TypeError, "icmp_burst"),
        ({"slot_size": 64 + MTU - 1}, ValueError, "slot_size"),
        ({"slot_size": 64 + 65536}, ValueError, "slot_size"),
        ({"local_addr": "10.0.0.300"}, ValueError, "local_addr"),
    ],
)
def test_constructor_checks_arguments(kw, exc, match):
    args = {"mtu": MTU, "local_addr": LOCAL} | kw
    with pytest.raises(exc, match=match):
        FastPath(**args)


def test_constructor_edges_work():
    fp = FastPath(
        mtu=68,
        local_addr="10.0.0.1",
        batch=1,
        headroom=0,
        max_routes=1,
        icmp_rate=0,
        icmp_burst=0,
        slot_size=68,
    )
    assert repr(fp).startswith("FastPath(mtu=68, local_addr=10.0.0.1, port=8285, batch=1, offload=False")
    assert "(max 1)" in repr(fp)


@settings(max_examples=100, deadline=None)
@given(
    start=route_tables(max_size=12),
    removed=route_tables(max_size=8),
    added=route_tables(max_size=8),
    data=st.data(),
)
def test_a_batch_update_matches_a_dict(start, removed, added, data):
    fp = FastPath(mtu=MTU, local_addr=LOCAL, batch=1, max_routes=64)
    fp.set_routes(start)
    # Half the removals aim at routes that exist.
    gone = list(removed) + [n for n in start if data.draw(st.booleans())]
    model = {n: p for n, p in start.items() if n not in gone} | added
    fp.update_routes(gone, added)
    assert fp.routes() == model
    assert set(fp.counters().peers) == set(model.values())
    for addr in probes(model, data):
        assert fp.lookup(addr) == brute_force(model, addr)


def test_a_batch_update_that_does_not_fit_changes_nothing():
    fp = FastPath(mtu=MTU, local_addr=LOCAL, max_routes=4)
    fp.set_routes({NET(f"10.{i}.0.0/16"): P2 for i in range(3)})
    before = fp.routes()
    with pytest.raises(FastPathError) as e:
        fp.update_routes([], {NET("10.7.0.0/16"): P3, NET("10.8.0.0/16"): P3})
    assert e.value.errno == errno.ENOSPC
    assert fp.routes() == before
    # Removals come first, so a full table takes a swap in one call.
    fp.update_routes([NET("10.0.0.0/16")], {NET("10.7.0.0/16"): P3, NET("10.8.0.0/16"): P3})
    assert set(fp.routes()) == {NET(f"10.{i}.0.0/16") for i in (1, 2, 7, 8)}
    with pytest.raises(ValueError, match="host bits"):
        fp.update_routes(["10.0.0.1/8"], {})


def test_the_table_grows_past_its_first_size_keeping_routes_and_peer_counters():
    """The table starts at INITIAL_ROUTES and doubles; 5,000 flannel hosts fit by default."""
    from tunproxy.fastpath import INITIAL_ROUTES

    fp = FastPath(mtu=MTU, local_addr=LOCAL, batch=1)
    assert fp.capacity == INITIAL_ROUTES
    subnets = [IPv4Network(f"10.{i // 256}.{i % 256}.0/24") for i in range(5000)]
    peers = [IPv4Address(f"192.0.{2 + i // 250}.{1 + i % 250}") for i in range(5000)]
    fp.update_routes([], dict(zip(subnets[:100], peers[:100], strict=True)))
    fp.add_route(subnets[100], peers[100])
    fp.update_routes([], dict(zip(subnets[101:], peers[101:], strict=True)))
    assert fp.capacity >= 5000
    assert len(fp.routes()) == 5000
    for net, peer in zip(subnets[::97], peers[::97], strict=True):
        assert fp.lookup(net.network_address + 7) == peer
    fp.update_routes(subnets[:4000], {})
    assert len(fp.routes()) == 1000 and fp.lookup("10.0.0.1") is None


def test_peer_counters_survive_the_table_growing(env):
    env.fp.set_routes({NET("10.0.0.0/8"): P2})
    env.inject(udp("10.9.0.1", "10.1.2.3"))
    assert env.tx() == 1
    receive(env.peers[P2], 1)
    before = env.counters().peers[P2]
    assert before.tx_packets == 1
    capacity = env.fp.capacity
    more = {IPv4Network(f"11.{i // 256}.{i % 256}.0/24"): P3 for i in range(capacity)}
    env.fp.update_routes([], more)
    assert env.fp.capacity > capacity
    assert env.counters().peers[P2] == before
    env.inject(udp("10.9.0.1", "10.1.2.3"))
    assert env.tx() == 1
    receive(env.peers[P2], 1)
    assert env.counters().peers[P2].tx_packets == 2


small_peers = st.sampled_from([P2, P3, P4, IPv4Address("127.0.0.5")])


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_many_batches_match_a_dict(data):
    """Batches that add, repoint and remove overlapping routes, with few peers shared among many routes."""
    fp = FastPath(mtu=MTU, local_addr=LOCAL, batch=1, max_routes=24)
    model: dict[IPv4Network, IPv4Address] = {}
    for _ in range(data.draw(st.integers(1, 12))):
        known = sorted(model)
        gone = data.draw(st.lists(st.sampled_from(known), max_size=6)) if known else []
        gone += list(data.draw(route_tables(max_size=3)))
        fresh = {net: data.draw(small_peers) for net in data.draw(route_tables(max_size=8))}
        if known:
            fresh |= {
                net: data.draw(small_peers) for net in data.draw(st.lists(st.sampled_from(known), max_size=4))
            }
        after = {n: p for n, p in model.items() if n not in gone} | fresh
        if len(after) > 24:
            with pytest.raises(FastPathError):
                fp.update_routes(gone, fresh)
        else:
            fp.update_routes(gone, fresh)
            model = after
        assert fp.routes() == model
        assert set(fp.counters().peers) == set(model.values())
        for addr in probes(model, data):
            assert fp.lookup(addr) == brute_force(model, addr)
