"""What tunproxy owns and refuses, without root: leftover devices, wide Networks, udp-only flags."""

from __future__ import annotations

import logging
from ipaddress import IPv4Address, IPv4Network

import pytest

from tunproxy import cli
from tunproxy.backends import BackendContext, create_backend
from tunproxy.leftovers import Kept, stale_devices
from tunproxy.model import ConfigError, NetworkConfig
from tunproxy.netlink import Underlay
from tunproxy.subnetenv import SubnetEnv, previous_subnet, read_previous_subnet, write_subnet_file

UNDERLAY = Underlay("eth1", 2, IPv4Address("192.0.2.11"), 24, 1500)


def test_stale_devices_are_tunproxys_names_the_backend_does_not_use():
    links = [
        ("lo", None),
        ("eth1", "veth"),
        ("tunproxy.1", "vxlan"),
        ("tunproxy.2", "vxlan"),
        ("tpvx.16777215", "vxlan"),
        ("flannel.1", "vxlan"),  # flannel's, not ours
        ("tunproxy.1x", "vxlan"),
        ("tunproxy0", "tun"),
        ("foo", "tun"),
        ("tunproxy0x", "tun"),
    ]
    assert stale_devices(links, Kept(devices=frozenset({"tunproxy.2"}))) == [
        "tunproxy.1",
        "tpvx.16777215",
        "tunproxy0",
    ]
    udp = Kept(devices=frozenset({"foo"}), tun_names=("tunproxy0", "foo"))
    assert stale_devices(links, udp) == ["tunproxy.1", "tunproxy.2", "tpvx.16777215", "tunproxy0"]


def test_a_network_of_every_address_is_refused_as_flannel_does():
    with pytest.raises(ConfigError, match=r"Network 0.0.0.0/0 covers every address, the default route too"):
        NetworkConfig.parse({"Network": "0.0.0.0/0"})
    assert NetworkConfig.parse({"Network": "0.0.0.0/1"}).network.prefixlen == 1


@pytest.mark.parametrize(
    "network, public_ip, message",
    [
        ("192.0.0.0/8", "192.0.2.11", "Network 192.0.0.0/8 contains the address 192.0.2.11 of eth1"),
        (
            "203.0.113.0/24",
            "203.0.113.7",
            "Network 203.0.113.0/24 contains the public IP 203.0.113.7 of eth1",
        ),
    ],
)
def test_a_network_covering_the_underlay_is_refused(network, public_ip, message):
    ctx = BackendContext(NetworkConfig.parse({"Network": network}), UNDERLAY, IPv4Address(public_ip))
    with pytest.raises(ConfigError, match=message):
        create_backend(ctx)


def backend_with(argv, env, backend, caplog):
    args, _ = cli.parse(["run", "--network", "10.100.0.0/16", "--subnet", "10.100.5.0/24", *argv], env)
    config = NetworkConfig.parse({"Network": "10.100.0.0/16", "Backend": {"Type": backend}})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tunproxy"):
        create_backend(BackendContext(config, UNDERLAY, UNDERLAY.address, cli.udp_flags(args)))
    return [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("backend", ["vxlan", "host-gw"])
def test_udp_flags_with_another_backend_warn_once_each_naming_their_source(backend, caplog):
    argv = ["--max-routes", "1", "--port", "9999", "--tun-name", "foo", "--batch", "8", "--no-offload"]
    warnings = backend_with(argv, {"FLANNELD_DROP_RING": "5"}, backend, caplog)
    sources = ["--port", "--batch", "--tun-name", "--max-routes", "FLANNELD_DROP_RING", "--no-offload"]
    assert warnings == [
        f"ignoring {s}: only the udp backend uses it, the backend is {backend}" for s in sources
    ]


def test_udp_flags_from_the_environment_and_with_udp(caplog):
    env = {"TUNPROXY_PORT": "9999"}
    assert backend_with([], env, "host-gw", caplog) == [
        "ignoring TUNPROXY_PORT: only the udp backend uses it, the backend is host-gw"
    ]
    assert backend_with([], {}, "host-gw", caplog) == []  # defaults are not "given"
    assert backend_with(["--batch", "8"], env, "udp", caplog) == []


def test_subnet_file_in_a_directory_that_is_a_file_says_so(tmp_path):
    (tmp_path / "dir").write_text("")
    with pytest.raises(NotADirectoryError) as caught:
        write_subnet_file(tmp_path / "dir" / "s.env", "FLANNEL_MTU=1472\n")
    assert caught.value.filename == str(tmp_path / "dir")


def test_subnet_env_at_run_time_is_one_line_then_retried(tmp_path, caplog):
    directory = tmp_path / "dir"
    directory.write_text("")
    env = SubnetEnv(directory / "s.env", write_subnet_file)
    with pytest.raises(NotADirectoryError):
        env.set("A=1\n", fatal=True)
    with caplog.at_level(logging.INFO, logger="tunproxy"):
        env.set("A=2\n", fatal=False)
        env.flush()
        env.flush()
        directory.unlink()
        env.flush()
        env.flush()
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot write the subnet file {directory / 's.env'}: {directory} is not a directory; "
        "still forwarding, retrying at each check",
        f"wrote the subnet file {directory / 's.env'}",
    ]
    assert (directory / "s.env").read_text() == "A=2\n"


def test_previous_subnet_from_subnet_env():
    text = "FLANNEL_NETWORK=10.100.0.0/16\nFLANNEL_SUBNET=10.100.5.1/24\nFLANNEL_MTU=1472\n"
    assert previous_subnet(text) == IPv4Network("10.100.5.0/24")
    assert previous_subnet('FLANNEL_SUBNET="10.100.6.1/24"') == IPv4Network("10.100.6.0/24")
    assert previous_subnet("FLANNEL_NETWORK=10.100.0.0/16\n") is None
    assert previous_subnet("FLANNEL_SUBNET=garbage") is None
    assert previous_subnet("FLANNEL_SUBNET=fd00::1/64") is None


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (None, None),  # a first run: nothing to say
        (b"FLANNEL_SUBNET=10.100.9.1/24\n", None),
        (b"\xff\xfe FLANNEL", "is not UTF-8 text"),
        (b"FLANNEL_SUBNET=garbage\n", "has no usable FLANNEL_SUBNET"),
    ],
)
def test_the_previous_subnet_file_is_read_or_one_warning_names_it(tmp_path, caplog, content, said):
    path = tmp_path / "subnet.env"
    if content is not None:
        path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        found = read_previous_subnet(path)
    assert found == (IPv4Network("10.100.9.0/24") if content and said is None else None)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ([] if said is None else [f"previous subnet file {path} {said}; ignoring it"])
    assert read_previous_subnet(None) is None


def test_a_previous_subnet_file_that_cannot_be_read_is_one_warning_naming_it(tmp_path, caplog):
    path = tmp_path / "subnet.env"
    path.mkdir()  # read_text: IsADirectoryError
    with caplog.at_level(logging.WARNING):
        assert read_previous_subnet(path) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot read the previous subnet file {path}: Is a directory"
    ]
