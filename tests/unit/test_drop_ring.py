"""The C drop ring: every drop recorded with reason, direction, peer, time and first bytes."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time

import pytest

from tests.support import packets as h
from tunproxy.counters import DROP_SNAP
from tunproxy.drops import decode, drop_records, format_drops, write_pcapng

from .test_fastpath import NET, P2, P3, Env, receive, udp


@pytest.fixture
def small_ring():
    e = Env(drop_ring=4)
    yield e
    e.close()


@pytest.fixture
def env():
    e = Env()
    yield e
    e.close()


def test_each_reason_is_recorded_with_its_packet(env):
    env.fp.set_routes({NET("10.1.0.0/16"): P2})
    no_route = udp("10.244.1.7", "10.2.0.5", size=200)
    env.now = 1234
    env.inject(no_route)
    assert env.tx() == 1
    stranger = udp("10.5.0.1", "10.244.0.9")
    env.send_from(P3, stranger)
    time.sleep(0.05)
    env.now = 1300
    assert env.rx() == 1
    r, w = os.pipe()
    try:
        env.inject(udp("10.9.0.1", "10.1.0.5"))
        assert env.fp.tun_to_udp(env.tun.fileno(), w, 1400) == 1  # sendmmsg on a pipe: ENOTSOCK
    finally:
        os.close(r), os.close(w)
    first, second, third = env.fp.drops()
    assert (first.reason, first.direction, first.peer, first.time_ms) == ("no_route", "tx", None, 1234)
    assert first.length == len(no_route) and first.data == no_route[:DROP_SNAP] and first.count == 1
    assert (second.reason, second.direction, second.peer, second.time_ms) == ("unknown_peer", "rx", P3, 1300)
    assert second.data == stranger
    assert (third.reason, third.peer) == ("send", P2)
    assert third.data == h.forward(udp("10.9.0.1", "10.1.0.5"))  # as it would have left: TTL - 1
    assert env.counters().drops["no_route"] == 1 and env.fp.drops_total == 3


def test_the_ring_keeps_the_newest(small_ring):
    env = small_ring
    sent = [udp("10.9.0.1", f"10.2.0.{i}") for i in range(1, 11)]
    env.inject(*sent)
    assert env.tx() == 10
    receive(env.kernel)  # the ICMP errors
    drops = env.fp.drops()
    assert [d.data for d in drops] == sent[-4:]
    assert env.fp.drops_total == 10 and env.counters().drops["no_route"] == 10


def test_no_ring_still_counts():
    e = Env(drop_ring=0)
    try:
        e.inject(udp("10.9.0.1", "10.2.0.1"))
        assert e.tx() == 1
        assert e.fp.drops() == [] and e.counters().drops["no_route"] == 1
    finally:
        e.close()


def test_decoding_and_pcapng(env, tmp_path):
    datagram = struct.pack("!HHHH", 1000, 2000, 18, 0) + bytes(10)
    packet = h.build_ipv4(src="10.244.1.7", dst="10.2.0.5", payload=datagram)
    env.inject(packet)
    env.tx()
    doc = drop_records(env.fp.drops(), now_ms=env.now + 2500, wall=1_800_000_000.0)
    [rec] = doc
    assert rec["reason"] == "no_route" and rec["age_seconds"] == 2.5
    assert decode(bytes.fromhex(rec["data"])) == {
        "src": "10.244.1.7",
        "dst": "10.2.0.5",
        "protocol": "udp",
        "sport": 1000,
        "dport": 2000,
        "length": 38,
    }
    assert "no_route" in format_drops({"drops": doc}) and "10.244.1.7:1000 > 10.2.0.5:2000" in format_drops(
        {"drops": doc}
    )
    path = tmp_path / "d.pcapng"
    with open(path, "wb") as f:
        write_pcapng(f, doc)
    assert path.read_bytes()[:4] == bytes.fromhex("0a0d0d0a")
    if shutil.which("tshark"):
        out = subprocess.run(
            [
                "tshark",
                "-r",
                str(path),
                "-T",
                "fields",
                "-e",
                "ip.src",
                "-e",
                "udp.dstport",
                "-e",
                "frame.comment",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.stdout.strip().split("\t") == [
            "10.244.1.7",
            "2000",
            "reason=no_route dir=tx peer=- count=1",
        ]
