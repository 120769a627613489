"""The sans-IO core of status/readiness: DaemonState, Sampler, the stats-line diff, socket paths."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from tunproxy.control import default_socket
from tunproxy.model import Lease
from tunproxy.observe import (
    LEASE_LOST,
    PROGRAMMING,
    READY,
    STARTING,
    DaemonState,
    PeerSample,
    PeerState,
    Sample,
    Sampler,
    changed_fields,
    format_status,
    status_document,
)

PEER = Lease(IPv4Network("10.100.18.0/24"), IPv4Address("192.0.2.12"), "udp")


def test_ready_only_with_a_lease_and_the_first_peer_list_applied():
    s = DaemonState()
    assert s.readiness()[0] == STARTING
    s.lease = Lease(IPv4Network("10.100.5.0/24"), IPv4Address("192.0.2.11"), "udp")
    assert s.readiness() == (PROGRAMMING, "waiting for the first list of peers")
    s.synced = True
    s.peers[PEER.subnet] = PeerState(PEER, "route table full")
    assert s.readiness() == (READY, "")  # one bad lease does not take the node out of service
    doc = status_document(s, Sampler(), now=0.0, wall=0.0)
    assert doc["peers"][0]["programmed"] is False and doc["peers"][0]["error"] == "route table full"
    assert "NOT PROGRAMMED: route table full" in format_status(doc)
    s.lease_problem = "our lease on 10.100.5.0/24 was lost; re-acquiring a subnet"
    assert s.readiness() == (LEASE_LOST, s.lease_problem)


def sample(at: float, rx: int, drops: int = 0) -> Sample:
    return Sample(
        at, {"rx_packets": rx}, {"no_route": drops}, {PEER.public_ip: PeerSample(0, 0, rx, rx * 100)}
    )


def test_sampler_rates_and_last_seen():
    sampler = Sampler()
    sampler.add(sample(10.0, 0))
    assert sampler.last_seen(PEER.public_ip, 11.0) is None  # never heard from
    assert sampler.peer_rates(PEER.public_ip)["rx_packets"] is None  # one sample: no rate yet
    sampler.add(sample(12.0, 10, drops=4))
    assert sampler.peer_rates(PEER.public_ip)["rx_bytes"] == 500.0
    assert sampler.drop_rate("no_route") == 2.0
    sampler.add(sample(13.0, 10, drops=4))
    assert sampler.last_seen(PEER.public_ip, 15.5) == 3.5  # last moved in the sample at 12.0


def test_status_document_and_text():
    s = DaemonState(backend="udp", lease=Lease(IPv4Network("10.100.5.0/24"), IPv4Address("192.0.2.11")))
    s.synced = True
    s.peers[PEER.subnet] = PeerState(PEER, None)
    sampler = Sampler()
    sampler.add(sample(1.0, 3, drops=1))
    doc = status_document(s, sampler, now=2.0, wall=0.0)
    assert doc["ready"] and doc["peers"][0]["rx_packets"] == 3 and doc["peers"][0]["last_seen_seconds"] == 1.0
    assert doc["drops"]["no_route"]["total"] == 1
    text = format_status(doc)
    assert "10.100.18.0/24  192.0.2.12" in text and "no_route" in text


def test_stats_line_names_only_what_changed():
    assert changed_fields(None, "a=1 b=2") == "a=1 b=2"
    assert changed_fields("a=1 b=2 c=3", "a=1 b=5 c=3") == "b=5"
    assert changed_fields("a=1", "a=1") == ""


def test_control_socket_is_unique_per_subnet_file():
    assert default_socket(Path("/run/tunproxy/subnet.env")) == Path("/run/tunproxy/tunproxy.sock")
    a, b = default_socket(Path("/tmp/a/subnet.env")), default_socket(Path("/tmp/b/subnet.env"))
    assert a != b and a.parent == b.parent == Path("/run/tunproxy")
    # No subnet file: keyed by the network namespace, so a lab's daemons (one per namespace) differ.
    import os

    netns = os.stat("/proc/self/ns/net").st_ino
    assert default_socket(None) == Path(f"/run/tunproxy/tunproxy-netns-{netns}.sock")


def test_ip_masq_ruleset_is_flannels_four_rules_in_our_own_table():
    from tunproxy.ipmasq import ruleset

    text = ruleset(IPv4Network("10.100.0.0/16"), IPv4Network("10.100.5.0/24"))
    lines = [line.strip() for line in text.splitlines()]
    assert lines[:3] == ["table ip tunproxy", "delete table ip tunproxy", "table ip tunproxy {"]
    assert lines[5:9] == [
        "ip saddr 10.100.0.0/16 ip daddr 10.100.0.0/16 return",
        "ip saddr 10.100.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random",
        "ip saddr != 10.100.0.0/16 ip daddr 10.100.5.0/24 return",
        "ip saddr != 10.100.0.0/16 ip daddr 10.100.0.0/16 masquerade fully-random",
    ]


def test_contrib_env_file_names_only_real_flags():
    import re

    from tunproxy.cli import build_parser, parse

    text = (Path(__file__).resolve().parents[2] / "contrib" / "tunproxy.env").read_text()
    names = re.findall(r"^#?(TUNPROXY_[A-Z_]+)=", text, re.M)
    run = build_parser()._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
    flags = {"TUNPROXY_" + a.dest.upper() for a in run._actions if a.option_strings}
    assert names and set(names) <= flags
    active = dict(re.findall(r"^(TUNPROXY_[A-Z_]+)=(.*)$", text, re.M))
    args, _ = parse(["run"], active)
    assert args.ip_masq is True and args.healthz_port == 8286
    unit = (Path(__file__).resolve().parents[2] / "contrib" / "tunproxy.service").read_text()
    assert "Type=notify" in unit and "EnvironmentFile=-/etc/default/tunproxy" in unit


def test_observe_options_from_flags_and_systemds_environment():
    import os

    import pytest

    from tunproxy.cli import parse
    from tunproxy.cli_observe import observe_options
    from tunproxy.model import ConfigError

    args, _ = parse(["run", "--healthz-port", "8286", "--subnet-file", "/tmp/x/subnet.env"], {})
    mine = {"NOTIFY_SOCKET": "@sd", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    o = observe_options(args, mine)
    assert (o.healthz_ip, o.healthz_port, o.notify_socket, o.watchdog_usec) == (
        "0.0.0.0",
        8286,
        "@sd",
        30000000,
    )
    assert o.control_socket == default_socket(Path("/tmp/x/subnet.env"))
    assert observe_options(args, {**mine, "WATCHDOG_PID": "1"}).watchdog_usec is None  # not ours
    with pytest.raises(ConfigError, match="--healthz-port 70000 is not a TCP port"):
        parse(["run", "--healthz-port", "70000"], {})
    with pytest.raises(ConfigError, match="--healthz-ip"):
        parse(["run", "--healthz-ip", "nope"], {})


def test_resolve_finds_the_only_live_daemon_and_refuses_to_guess(tmp_path):
    import socket

    import pytest

    from tunproxy.control import NoDaemon, resolve

    with pytest.raises(NoDaemon, match="no tunproxy daemon is running"):
        resolve(None, None, tmp_path)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "tunproxy-dead.sock"))
    stale.close()  # a socket file nobody listens on: a killed daemon's
    live = []
    for name in ("tunproxy.sock", "tunproxy-abc.sock"):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(tmp_path / name))
        s.listen(1)
        live.append(s)
    try:
        with pytest.raises(NoDaemon, match="2 tunproxy daemons run .*choose one with --control-socket"):
            resolve(None, None, tmp_path)
        live.pop().close()
        assert resolve(None, None, tmp_path) == tmp_path / "tunproxy.sock"
        assert resolve("/x.sock", "/y/subnet.env", tmp_path) == Path("/x.sock")
    finally:
        for s in live:
            s.close()
