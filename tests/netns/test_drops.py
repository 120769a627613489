"""``tunproxy drops`` on a live daemon: what it dropped, why, and the same packets in a pcapng."""

from __future__ import annotations

import json
import subprocess

import pytest

from .labkit import HOSTS, build_udp, eventually, overlay_of, start_udp
from .test_status import tunproxy

pytestmark = pytest.mark.root

STRANGER_SEND = (
    "import socket, struct\n"
    "udp = struct.pack('!HHHH', 4444, 53, 12, 0) + b'tpx!'\n"
    "ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 32, 7, 0, 64, 17, 0, bytes([10, 100, 99, 1]), "
    "bytes([10, 100, 5, 9])) + udp\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.sendto(ip, ('{target}', 8285))\n"
)


def test_a_stranger_and_an_unleased_subnet_show_up_with_their_reasons_and_in_a_pcap(lab):
    hosts = build_udp(lab, names=("h1", "h2"), stranger=True)
    start_udp(hosts["h1"], peers=("h2",))
    start_udp(hosts["h2"], peers=("h1",))
    h1 = hosts["h1"]
    h1.wait_ping(overlay_of("h2"))
    subnet_file = str(lab.workdir / "h1-subnet.env")
    hosts["h9"].ns.run("python3", "-c", STRANGER_SEND.format(target=HOSTS["h1"][0]))
    h1.ns.run(
        "python3",
        "-c",
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        f"s.bind(('{overlay_of('h1')}', 5353)); s.sendto(b'x' * 20, ('10.100.77.1', 9999))",
    )

    def drops():
        out = tunproxy("drops", "--subnet-file", subnet_file, "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["drops"]

    got = eventually(lambda: len(d := drops()) >= 2 and d, 5, "two drops")
    by_reason = {d["reason"]: d for d in got}
    stranger = by_reason["unknown_peer"]
    assert stranger["direction"] == "rx" and stranger["peer"] == "192.0.2.99"
    assert stranger["packet"] == {
        "src": "10.100.99.1",
        "dst": "10.100.5.9",
        "protocol": "udp",
        "sport": 4444,
        "dport": 53,
        "length": 32,
    }
    unleased = by_reason["no_route"]
    assert unleased["direction"] == "tx" and unleased["peer"] is None
    assert unleased["packet"] == {
        "src": overlay_of("h1"),
        "dst": "10.100.77.1",
        "protocol": "udp",
        "sport": 5353,
        "dport": 9999,
        "length": 48,
    }

    table = tunproxy("drops", "--subnet-file", subnet_file)
    assert "unknown_peer  rx   192.0.2.99" in table.stdout
    assert f"udp {overlay_of('h1')}:5353 > 10.100.77.1:9999 len 48" in table.stdout

    pcap = lab.workdir / "drops.pcapng"
    out = tunproxy("drops", "--subnet-file", subnet_file, "--pcap", str(pcap))
    assert out.returncode == 0, out.stderr
    fields = ["ip.src", "ip.dst", "udp.srcport", "udp.dstport", "frame.comment"]
    shark = subprocess.run(
        ["tshark", "-r", str(pcap), "-T", "fields", *[a for f in fields for a in ("-e", f)]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shark.returncode == 0, shark.stderr
    rows = [line.split("\t") for line in shark.stdout.splitlines()]
    assert [
        "10.100.99.1",
        "10.100.5.9",
        "4444",
        "53",
        "reason=unknown_peer dir=rx peer=192.0.2.99 count=1",
    ] in rows
    assert [overlay_of("h1"), "10.100.77.1", "5353", "9999", "reason=no_route dir=tx peer=- count=1"] in rows
    assert len(rows) == len(got)
