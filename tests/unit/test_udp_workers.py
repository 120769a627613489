"""The pure parts of ``--workers``: the TUNSETIFF request, the flow-steering program, the sums.

The classic BPF program is run by a small interpreter of the instructions it
uses (semantics from linux/filter.h and Documentation/networking/filter.rst),
on packets built here, so what the kernel would answer is checked without root.
"""

from __future__ import annotations

import os
import select
import struct
import threading
from ipaddress import IPv4Address, IPv4Network

import pytest

from tunproxy import cli
from tunproxy.backend_config import default_workers
from tunproxy.backends.udp_devices import IFF_MULTI_QUEUE, IFF_NO_PI, IFF_TUN, IFF_VNET_HDR, ifreq
from tunproxy.backends.udp_steering import flow_steering_program
from tunproxy.backends.udp_workers import WorkerPool, merge_drops, sum_counters
from tunproxy.counters import COUNTERS, Counters, Drop, PeerCounters
from tunproxy.fastpath import FastPath

MASK = 0xFFFFFFFF


def threads(pool: WorkerPool) -> list[threading.Thread]:
    return [w.thread for w in pool.workers]


def run_cbpf(program, packet: bytes) -> int:
    """What the kernel's classic BPF returns for ``packet`` (the subset the program uses)."""
    a = x = 0
    mem = [0] * 16
    pc = 0

    def load(offset: int, size: int) -> int:
        if offset + size > len(packet):
            raise IndexError  # the kernel ends the program and returns 0
        return int.from_bytes(packet[offset : offset + size], "big")

    try:
        while True:
            code, jt, jf, k = program[pc]
            pc += 1
            if code == 0x20:
                a = load(k, 4)
            elif code == 0x30:
                a = load(k, 1)
            elif code == 0x40:
                a = load(x + k, 4)
            elif code == 0x60:
                a = mem[k]
            elif code == 0x61:
                x = mem[k]
            elif code == 0xB1:
                x = 4 * (load(k, 1) & 0xF)
            elif code == 0x02:
                mem[k] = a
            elif code == 0xAC:
                a ^= x
            elif code == 0x74:
                a >>= k
            elif code == 0x54:
                a &= k
            elif code == 0x24:
                a = (a * k) & MASK
            elif code == 0x94:
                a %= k
            elif code == 0x07:
                x = a
            elif code == 0x15:
                pc += jt if a == k else jf
            elif code == 0x16:
                return a
            else:
                raise AssertionError(f"instruction {code:#x} not in the interpreter")
    except IndexError:
        return 0


def packet(src: str, dst: str, proto: int = 6, sport: int = 0, dport: int = 0, options: bytes = b"") -> bytes:
    ihl = (20 + len(options)) // 4
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        20 + len(options) + 8,
        0,
        0,
        64,
        proto,
        0,
        IPv4Address(src).packed,
        IPv4Address(dst).packed,
    )
    return header + options + struct.pack("!HHI", sport, dport, 0)


def test_ifreq_is_the_kernels_struct():
    raw = ifreq("tunproxy0", IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE | IFF_VNET_HDR)
    assert len(raw) == 40
    assert raw[:16] == b"tunproxy0".ljust(16, b"\0")
    assert struct.unpack_from("H", raw, 16)[0] == 0x5101
    with pytest.raises(ValueError, match="1 to 15 bytes"):
        ifreq("a-name-far-too-long", IFF_TUN)


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 64])
def test_steering_keeps_a_flow_and_its_replies_on_one_worker(workers):
    program = flow_steering_program(workers)
    for sport in range(40000, 40200, 2):
        there = run_cbpf(program, packet("10.100.5.1", "10.100.18.7", 6, sport, 5201))
        back = run_cbpf(program, packet("10.100.18.7", "10.100.5.1", 6, 5201, sport))
        assert there == back and 0 <= there < workers


def test_steering_spreads_flows_that_differ_only_in_even_ports():
    # Linux hands connect() even ephemeral ports: the low bit of a port says nothing.
    program = flow_steering_program(2)
    chosen = [
        run_cbpf(program, packet("10.100.5.0", "10.100.18.0", 6, p, 5201)) for p in range(50000, 50016, 2)
    ]
    assert 2 <= chosen.count(0) <= 6, chosen


def test_steering_reads_ports_after_ip_options_and_ignores_them_for_icmp():
    program = flow_steering_program(4)
    chosen = {
        run_cbpf(program, packet("10.100.5.1", "10.100.18.7", 17, p, 53, options=b"\x01" * 4))
        for p in range(1000, 1064)
    }
    assert len(chosen) == 4  # UDP ports are read past the options
    icmp = {run_cbpf(program, packet("10.100.5.1", "10.100.18.7", 1, p, p)) for p in range(1000, 1064)}
    assert len(icmp) == 1  # no ports: the addresses alone
    assert run_cbpf(program, b"\x45") == 0  # too short: the kernel's answer for a failed load


def test_steering_refuses_a_bad_count():
    with pytest.raises(ValueError, match="1..65535"):
        flow_steering_program(0)


def counters(base: int, gauge: int, peers: dict[str, int]) -> Counters:
    values = {name: (gauge if c.gauge else base) for name, c in COUNTERS.items()}
    return Counters(values, {IPv4Address(a): PeerCounters(n, 10 * n, n, 10 * n) for a, n in peers.items()})


def test_counters_add_up_and_gauges_take_the_largest():
    total = sum_counters(
        [counters(3, 8, {"192.0.2.12": 1}), counters(4, 5, {"192.0.2.12": 2, "192.0.2.13": 7})]
    )
    assert total.tx_bytes == 7 and total.drop_no_route == 7
    assert total.tx_max_batch == 8 and total.rx_max_batch == 8
    assert total.peers[IPv4Address("192.0.2.12")] == PeerCounters(3, 30, 3, 30)
    assert total.peers[IPv4Address("192.0.2.13")] == PeerCounters(7, 70, 7, 70)
    with pytest.raises(ValueError):
        sum_counters([])


def test_drops_merge_oldest_first():
    def drop(t: int) -> Drop:
        return Drop(t, "no_route", "tx", None, 84, 1, b"")

    merged = merge_drops([[drop(1), drop(5)], [drop(2), drop(9)], []])
    assert [d.time_ms for d in merged] == [1, 2, 5, 9]


@pytest.mark.parametrize(("cpus", "workers"), [(None, 1), (1, 1), (2, 1), (3, 1), (4, 2), (8, 4), (256, 4)])
def test_default_workers(cpus, workers):
    assert default_workers(cpus) == workers


@pytest.mark.parametrize("c_loop", [True, False], ids=["c-loop", "python-epoll"])
def test_route_changes_reach_every_worker_and_stop_joins_every_thread(c_loop):
    """With the c-loop each thread waits in C holding its fast path's lock: every change and
    read below must make it give the lock up (or this hangs), and take it back after."""
    paths = [FastPath(mtu=1472, local_addr="10.100.5.0") for _ in range(3)]
    pipes = [os.pipe() for _ in range(6)]  # stand-ins for the queues and sockets: never readable
    try:
        pool = WorkerPool(
            paths, [r for r, _ in pipes[:3]], [r for r, _ in pipes[3:]], lambda d, e: None, c_loop=c_loop
        )
        before = set(threading.enumerate())
        pool.start()
        assert all(t.is_alive() for t in threads(pool))
        net, peer = IPv4Network("10.100.18.0/24"), IPv4Address("192.0.2.12")
        pool.update_routes([], {net: peer})
        assert [p.lookup("10.100.18.7") for p in paths] == [peer] * 3
        pool.update_routes([net], {})
        assert [p.lookup("10.100.18.7") for p in paths] == [None] * 3
        pool.set_routes({net: IPv4Address("192.0.2.13")})
        assert [p.routes() for p in paths] == [{net: IPv4Address("192.0.2.13")}] * 3
        assert pool.counters().tx_packets == 0 and pool.drops() == [] and pool.drops_total == 0
        assert all(t.is_alive() for t in threads(pool))  # each went back to waiting
        pool.stop()
        assert not any(t.is_alive() for t in threads(pool))
        assert set(threading.enumerate()) <= before
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_a_stopped_c_loop_pool_still_takes_route_changes_and_reads():
    """Between a stop and the next pool (a deleted TUN being made again), the event loop still
    changes routes and reads counters: the fast paths are reused, so nothing may be lost."""
    paths = [FastPath(mtu=1472, local_addr="10.100.5.0") for _ in range(2)]
    pipes = [os.pipe() for _ in range(4)]
    try:
        pool = WorkerPool(
            paths, [r for r, _ in pipes[:2]], [r for r, _ in pipes[2:]], lambda d, e: None, c_loop=True
        )
        pool.start()
        pool.stop()
        net, peer = IPv4Network("10.100.18.0/24"), IPv4Address("192.0.2.12")
        pool.update_routes([], {net: peer})
        assert [p.lookup("10.100.18.7") for p in paths] == [peer] * 2
        assert pool.counters().tx_packets == 0 and pool.drops_total == 0
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


@pytest.mark.parametrize("c_loop", [True, False], ids=["c-loop", "python-epoll"])
def test_a_worker_that_died_is_started_again_by_revive(caplog, c_loop):
    """A bug that ends a worker's thread must not leave its queue unread for ever."""
    paths = [FastPath(mtu=1472, local_addr="10.100.5.0") for _ in range(2)]
    pipes = [os.pipe() for _ in range(4)]
    calls = []

    def broken(*args):
        calls.append(args)
        raise RuntimeError("a bug")

    try:
        pool = WorkerPool(
            paths, [r for r, _ in pipes[:2]], [r for r, _ in pipes[2:]], lambda d, e: None, c_loop=c_loop
        )
        if c_loop:  # the bug: the C loop's call raises once its "TUN" is readable, then works
            real_run = paths[1].run

            def broken_loop(*args):
                if calls:
                    return real_run(*args)
                select.select([pipes[1][0]], [], [])
                broken(*args)

            paths[1].run = broken_loop  # type: ignore[method-assign]
        else:
            paths[1].tun_to_udp = broken  # type: ignore[method-assign]
        pool.start()
        assert pool.revive() == []  # nothing died yet
        os.write(pipes[1][1], b"x")  # worker 1's "TUN queue" becomes readable: its call raises
        for _ in range(200):
            if pool.workers[1].died:
                break
            threading.Event().wait(0.01)
        assert pool.workers[1].died and not pool.workers[0].died
        assert "worker 1 stopped" in caplog.text
        os.read(pipes[1][0], 1)  # drained, so the restarted thread waits again
        assert pool.revive() == [1]
        assert all(t.is_alive() for t in threads(pool)) and len(calls) == 1
        pool.stop()
        assert not any(t.is_alive() for t in threads(pool))
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


@pytest.mark.parametrize("flag", ["--workers=0", "--workers=65", "--workers=two"])
def test_workers_is_range_checked(flag, capsys):
    base = ["run", "--network", "10.100.0.0/16", "--subnet", "10.100.5.0/24", "--subnet-file", ""]
    code = cli.main([*base, flag])
    err = capsys.readouterr().err
    assert code == 2 and "--workers" in err and len(err.strip().splitlines()) == 1
