"""/healthz, /readyz and /metrics of live daemons, fetched over HTTP from inside the lab."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab.hosts import SEGMENT, UNDERLAY
from lab.netns import free_port

from .labkit import HOSTS, NETWORK, build_udp, etcd_in_lab, eventually, overlay_of, start_etcd, start_udp

pytestmark = pytest.mark.root


def fetch(host, port: int, path: str) -> tuple[int, str]:
    """(status, body) of GET http://<host's address>:port/path, from inside ``host``'s namespace."""
    code = (
        "import sys, urllib.request, urllib.error\n"
        f"try:\n r = urllib.request.urlopen('http://{host.address}:{port}{path}', timeout=5)\n"
        " print(r.status); print(r.read().decode(), end='')\n"
        "except urllib.error.HTTPError as e:\n print(e.code); print(e.read().decode(), end='')\n"
        "except OSError as e:\n print(0); print(e, end='')\n"
    )
    out = host.ns.run("python3", "-c", code, timeout=15)
    status, _, body = out.stdout.partition("\n")
    return int(status), body


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page, parsed by prometheus-client's own parser."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_health_and_metrics_of_a_udp_daemon(lab):
    hosts = build_udp(lab, names=("h1", "h2"), stranger=True)
    port = free_port()
    start_udp(hosts["h1"], "--healthz-port", str(port), peers=("h2",))
    start_udp(hosts["h2"], peers=("h1",))
    h1 = hosts["h1"]
    assert fetch(h1, port, "/healthz") == (200, "ok\n")
    eventually(lambda: fetch(h1, port, "/readyz") == (200, "ready\n"), 5, "ready")
    h1.wait_ping(overlay_of("h2"))
    before = samples(fetch(h1, port, "/metrics")[1])
    assert h1.ping(overlay_of("h2"), count=3).returncode == 0
    # A datagram from a stranger, and a packet to a subnet nobody leased.
    hosts["h9"].ns.run("python3", "-c", _send_stranger(HOSTS["h1"][0]))
    h1.ping("10.100.77.1", timeout=1)
    status, text = fetch(h1, port, "/metrics")
    assert status == 200
    after = samples(text)
    peer = (("public_ip", HOSTS["h2"][0]), ("subnet", HOSTS["h2"][1]))
    for name in ("tunproxy_peer_tx_packets_total", "tunproxy_peer_rx_packets_total"):
        assert after[(name, peer)] - before[(name, peer)] == 3
    assert (
        after[("tunproxy_peer_tx_bytes_total", peer)] - before[("tunproxy_peer_tx_bytes_total", peer)] == 252
    )
    drops = "tunproxy_dropped_packets_total"
    assert after[(drops, (("reason", "unknown_peer"),))] == before[(drops, (("reason", "unknown_peer"),))] + 1
    assert after[(drops, (("reason", "no_route"),))] == before[(drops, (("reason", "no_route"),))] + 1
    assert after[("tunproxy_icmp_errors_sent_total", ())] >= 1  # host unreachable for 10.100.77.1
    assert after[("tunproxy_build_info", (("backend", "udp"), ("version", "0.1.0")))] == 1
    assert after[("tunproxy_peers", ())] == 1 and after[("tunproxy_ready", ())] == 1
    assert ("tunproxy_gso_sends_total", ()) in after and ("tunproxy_rx_max_batch", ()) in after


def _send_stranger(target: str) -> str:
    # 28 bytes: a minimal IPv4 header + 8, from an address that is no peer.
    packet = "45000014000000004001" + "0000" + "0a640501" + "0a640501"
    return (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        f"s.sendto(bytes.fromhex('{packet}'), ('{target}', 8285))"
    )


def test_readyz_is_503_while_our_lease_is_lost_and_200_once_reacquired(lab):
    lab.segment(SEGMENT, UNDERLAY)
    server = etcd_in_lab(lab, "udp")
    # One subnet in the whole range: a squatter on it leaves nothing to re-acquire.
    only = HOSTS["h1"][1]
    config = {"Network": NETWORK, "SubnetLen": 24, "SubnetMin": only[:-3], "SubnetMax": only[:-3]}
    server.etcdctl("put", "/coreos.com/network/config", json.dumps(config))
    h1 = lab.add_host("h1", SEGMENT, HOSTS["h1"][0])
    port = free_port()
    try:
        proc, subnet = start_etcd(h1, server, "--healthz-port", str(port))
        assert subnet == only
        eventually(lambda: fetch(h1, port, "/readyz") == (200, "ready\n"), 10, "ready")
        metrics = samples(fetch(h1, port, "/metrics")[1])
        assert metrics[("tunproxy_store_reachable", ())] == 1
        assert metrics[("tunproxy_watch_revision", ())] > 0
        assert metrics[("tunproxy_lease_expiry_timestamp_seconds", ())] > 1e9

        key = f"/coreos.com/network/subnets/{only.replace('/', '-')}"
        server.etcdctl("put", key, json.dumps({"PublicIP": "192.0.2.99", "BackendType": "udp"}))
        status, body = eventually(
            lambda: (r := fetch(h1, port, "/readyz"))[0] == 503 and r, 10, "readyz to fail"
        )
        assert body == f"lease lost: our lease on {only} was lost; re-acquiring a subnet\n"
        assert fetch(h1, port, "/healthz")[0] == 200  # alive all the same
        server.etcdctl("del", key)
        eventually(lambda: fetch(h1, port, "/readyz") == (200, "ready\n"), 40, "ready again")
        assert (
            json.loads(server.etcdctl("get", key, "--print-value-only").stdout)["PublicIP"] == HOSTS["h1"][0]
        )
    finally:
        for p in lab.processes:
            p.stop(timeout=5)
        server.close()


def test_a_taken_healthz_port_is_one_line(lab):
    hosts = build_udp(lab, names=("h1",))
    port = free_port()
    hosts["h1"].start("python3", "-m", "http.server", "-b", HOSTS["h1"][0], str(port), name="squatter")
    eventually(lambda: fetch(hosts["h1"], port, "/")[0] == 200, 10, "the squatter to listen")
    proc = hosts["h1"].tunproxy(
        "--network",
        NETWORK,
        "--subnet",
        HOSTS["h1"][1],
        "--healthz-ip",
        HOSTS["h1"][0],
        "--healthz-port",
        str(port),
    )
    assert proc.popen.wait(20) == 2
    err = [line for line in proc.output().splitlines() if "error" in line]
    assert err == [
        f"tunproxy: error: cannot serve /healthz on {HOSTS['h1'][0]}:{port}: Address already in use"
    ]
