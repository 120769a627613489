"""What a new user's review found after the faults and flannel work, each as a test."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from tunproxy import cli
from tunproxy.backends.base import RouteTableFull
from tunproxy.daemon import Daemon, DaemonOptions
from tunproxy.model import Lease, LeaseAdded, LeaseRemoved, NetworkConfig
from tunproxy.peers.static import StaticRegistry
from tunproxy.watcher import LeaseWatcher

STATIC = ["run", "--network", "10.100.0.0/16", "--subnet", "10.100.5.0/24", "--subnet-file", ""]
NOT_UTF8 = b"\xff\xfe[]"


def one_line(capsys: pytest.CaptureFixture[str], argv: list[str], environ: dict[str, str]) -> str:
    assert cli.main(argv, environ) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_net_conf_that_is_not_utf8_is_one_line_naming_it(tmp_path: Path, capsys) -> None:
    path = tmp_path / "net-conf.json"
    path.write_bytes(NOT_UTF8)
    line = one_line(capsys, ["run", "--subnet", "10.100.5.0/24"], {"FLANNELD_NET_CONFIG_PATH": str(path)})
    assert line == f"tunproxy: error: FLANNELD_NET_CONFIG_PATH {path} is not UTF-8 text"


def test_a_peers_file_that_is_not_utf8_is_one_line_at_start(tmp_path: Path, capsys) -> None:
    path = tmp_path / "peers.json"
    path.write_bytes(NOT_UTF8)
    line = one_line(capsys, [*STATIC, "--peers-file", str(path)], {})
    assert line == f"tunproxy: error: --peers-file {path} is not UTF-8 text"


def test_a_peers_file_that_turns_to_garbage_keeps_the_table_on_sighup(tmp_path: Path, caplog) -> None:
    path = tmp_path / "peers.json"
    path.write_text(json.dumps([{"PublicIP": "192.0.2.12", "Subnet": "10.100.6.0/24"}]))
    config = NetworkConfig.parse({"Network": "10.100.0.0/16"})
    registry = StaticRegistry(config, IPv4Network("10.100.5.0/24"), {}, path)
    path.write_bytes(NOT_UTF8)
    with caplog.at_level(logging.ERROR):
        registry.reload()
    assert [lease.subnet for lease in registry.current] == [IPv4Network("10.100.6.0/24")]
    assert [r.getMessage() for r in caplog.records] == [
        f"peers not reloaded, keeping the previous 1: peers file {path} is not UTF-8 text"
    ]


def test_an_etcd_ca_file_that_is_not_pem_is_one_line_naming_the_flag(tmp_path: Path, capsys) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not a pem\n")
    argv = ["run", "--etcd-endpoints", "https://127.0.0.1:2379", "--etcd-cafile", str(ca)]
    assert one_line(capsys, argv, {}) == f"tunproxy: error: --etcd-cafile {ca} holds no PEM certificate"
    line = one_line(
        capsys, ["leases", "--etcd-endpoints", "https://127.0.0.1:2379"], {"TUNPROXY_ETCD_CAFILE": str(ca)}
    )
    assert line == f"tunproxy: error: TUNPROXY_ETCD_CAFILE {ca} holds no PEM certificate"


def test_an_etcd_cert_and_key_that_do_not_load_are_one_line(tmp_path: Path, capsys) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("junk")
    key.write_text("junk")
    argv = [
        "leases",
        "--etcd-endpoints",
        "https://127.0.0.1:2379",
        "--etcd-certfile",
        str(cert),
        "--etcd-keyfile",
        str(key),
    ]
    assert "are not a PEM certificate and its private key" in one_line(capsys, argv, {})


def test_run_takes_version_as_flanneld_does(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.parse(["run", "--version"], {})
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("tunproxy ")


class OneRouteBackend:
    """A backend whose table holds one route; records every apply call."""

    name = "udp"

    def __init__(self) -> None:
        self.routes: dict[IPv4Network, Lease] = {}
        self.calls: list[tuple[list[IPv4Network], list[IPv4Network]]] = []

    async def apply(self, removed: Sequence[Lease], added: Sequence[Lease]) -> list[tuple[Lease, Exception]]:
        self.calls.append(([lease.subnet for lease in removed], [lease.subnet for lease in added]))
        for lease in removed:
            self.routes.pop(lease.subnet, None)
        failures: list[tuple[Lease, Exception]] = []
        for lease in added:
            if lease.subnet not in self.routes and len(self.routes) >= 1:
                failures.append((lease, RouteTableFull("route table full (1 routes)")))
            else:
                self.routes[lease.subnet] = lease
        return failures


def lease(n: int) -> Lease:
    return Lease(IPv4Network(f"10.100.{n // 8}.{n % 8 * 32}/27"), IPv4Address("192.0.2.12"), "udp")


def test_a_waiting_lease_is_retried_once_per_burst_after_its_removals() -> None:
    """A revocation of 1,200 peers used to offer the waiting lease again in every chunk of 512,
    adding it and removing it within the burst, and logging additions nobody made."""

    async def main() -> OneRouteBackend:
        daemon = Daemon(None, DaemonOptions(iface=None, public_ip=None, subnet_file=None))  # type: ignore[arg-type]
        backend = daemon.backend = OneRouteBackend()  # type: ignore[assignment]
        daemon.watcher = LeaseWatcher("udp")
        await daemon._apply(daemon.watcher.reset([lease(1), lease(2)]))
        assert set(backend.routes) == {lease(1).subnet} and set(daemon.waiting.leases) == {lease(2).subnet}
        burst = [LeaseAdded(lease(n)) for n in range(10, 1210)]
        await daemon._apply(daemon.watcher.update(burst))
        backend.calls.clear()
        await daemon._apply(
            daemon.watcher.update([LeaseRemoved(lease(n).subnet) for n in (1, *range(10, 1210))])
        )
        return backend

    backend = asyncio.run(main())
    offered = [added for _, added in backend.calls if lease(2).subnet in added]
    assert offered == [[lease(2).subnet]]  # once, after every removal
    assert set(backend.routes) == {lease(2).subnet}


def test_net_conf_keys_match_as_go_decodes_them_ignoring_case() -> None:
    """flanneld reads net-conf.json with Go's encoding/json: key case does not matter there."""
    doc = (
        '{"network": "10.100.0.0/16", "subnetlen": 26,'
        ' "backend": {"type": "vxlan", "vni": 7, "directrouting": true}}'
    )
    config = NetworkConfig.parse(doc)
    assert (config.network, config.subnet_len, config.backend_type) == (
        IPv4Network("10.100.0.0/16"),
        26,
        "vxlan",
    )
    assert config.backend.raw == {"VNI": 7, "DirectRouting": True} and config.warnings == ()
    assert (config.backend.vni, config.backend.direct_routing) == (7, True)  # type: ignore[attr-defined]
    exact = NetworkConfig.parse('{"Network": "10.100.0.0/16", "NETWORK": "10.7.0.0/16"}')
    assert exact.network == IPv4Network("10.100.0.0/16")  # the exact spelling wins


def test_a_missing_peers_file_from_the_environment_names_the_variable(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope.json"
    line = one_line(capsys, STATIC, {"TUNPROXY_PEERS_FILE": str(missing)})
    assert line == f"tunproxy: error: cannot read TUNPROXY_PEERS_FILE {missing}: No such file or directory"


def test_an_interface_from_the_environment_is_named_with_its_variable() -> None:
    from tunproxy.model import ConfigError
    from tunproxy.netlink import InterfaceChoice, find_underlay

    with pytest.raises(ConfigError) as flag:
        find_underlay(InterfaceChoice(("tp-nope0",)))
    assert str(flag.value) == "interface 'tp-nope0' does not exist"
    labels = ("FLANNELD_IFACE", "--iface-regex", "--iface-can-reach")
    with pytest.raises(ConfigError) as variable:
        find_underlay(InterfaceChoice(("tp-nope0",), labels=labels))
    assert str(variable.value) == "interface 'tp-nope0' does not exist (FLANNELD_IFACE tp-nope0)"
