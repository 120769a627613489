import json
from ipaddress import IPv4Address, IPv4Network

import pytest

from tunproxy.model import (
    ConfigError,
    Lease,
    LeaseError,
    NetworkConfig,
    check_peers,
    parse_network,
    parse_subnet_key,
    subnet_key,
)


@pytest.mark.parametrize(
    "text, message",
    [
        ("10.100.0.0", "no prefix length"),
        ("10.100.0.0/33", "not an IPv4 CIDR"),
        ("10.100.1.0/16", "host bits set"),
        ("fd00::/64", "IPv6"),
        ("banana", "not an IPv4 CIDR"),
    ],
)
def test_bad_cidrs_say_what_is_wrong(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_network(text)


def test_subnet_key_round_trip():
    net = IPv4Network("10.100.5.0/24")
    assert subnet_key(net) == "10.100.5.0-24"
    assert parse_subnet_key("/coreos.com/network/subnets/10.100.5.0-24") == net
    with pytest.raises(LeaseError):
        parse_subnet_key("/coreos.com/network/subnets/10.100.5.0")


def test_flannel_defaults_for_a_slash_16():
    config = NetworkConfig.parse('{"Network": "10.100.0.0/16"}')
    assert config.subnet_len == 24
    assert config.subnet_min == IPv4Address("10.100.1.0")
    assert config.subnet_max == IPv4Address("10.100.255.0")
    assert config.backend_type == "udp"
    subnets = list(config.candidate_subnets())
    assert len(subnets) == 255 and subnets[0] == IPv4Network("10.100.1.0/24")


def test_small_networks_split_in_four():
    assert NetworkConfig.parse({"Network": "10.0.0.0/26"}).subnet_len == 28
    with pytest.raises(ConfigError, match="too small"):
        NetworkConfig.parse({"Network": "10.0.0.0/29"})


@pytest.mark.parametrize(
    "doc, message",
    [
        ({}, 'no "Network"'),
        ({"Network": "10.100.0.0/16", "SubnetLen": 31}, "/30 or shorter"),
        ({"Network": "10.100.0.0/16", "SubnetLen": 17}, "fewer than four"),
        ({"Network": "10.100.0.0/16", "SubnetMin": "10.101.0.0"}, "not in the range"),
        ({"Network": "10.100.0.0/16", "SubnetMax": "10.100.3.7"}, "boundary"),
        ({"Network": "10.100.0.0/16", "SubnetMin": "10.100.9.0", "SubnetMax": "10.100.3.0"}, "above"),
        ({"Network": "10.100.0.0/16", "Backend": {"Type": "ipsec"}}, "not one of"),
        ({"Network": "10.100.0.0/16", "SubnetLen": "24"}, "integer"),
    ],
)
def test_bad_configs(doc, message):
    with pytest.raises(ConfigError, match=message):
        NetworkConfig.parse(doc)


def test_bad_json_is_one_line():
    with pytest.raises(ConfigError, match="not valid JSON") as e:
        NetworkConfig.parse("{Network: 10")
    assert "\n" not in str(e.value)


def test_backend_options_round_trip():
    config = NetworkConfig.parse({"Network": "10.100.0.0/16", "Backend": {"Type": "vxlan", "VNI": 7}})
    assert config.backend.raw == {"VNI": 7}
    assert NetworkConfig.parse(config.to_json()) == config


def test_fits_and_check_subnet():
    config = NetworkConfig.parse({"Network": "10.100.0.0/16"})
    assert config.fits(IPv4Network("10.100.5.0/24"))
    assert not config.fits(IPv4Network("10.100.0.0/24"))  # below SubnetMin: the first is skipped
    assert not config.fits(IPv4Network("10.100.5.0/25"))
    with pytest.raises(ConfigError, match="outside"):
        config.check_subnet(IPv4Network("10.101.5.0/24"))


def test_lease_parse_and_compare():
    value = json.dumps({"PublicIP": "192.0.2.12", "BackendType": "vxlan", "BackendData": {"VNI": 1}})
    lease = Lease.parse("/coreos.com/network/subnets/10.100.18.0-24", value)
    assert lease.public_ip == IPv4Address("192.0.2.12")
    assert lease == Lease.parse("10.100.18.0-24", lease.to_json())
    with pytest.raises(LeaseError, match="not JSON"):
        Lease.parse("10.100.18.0-24", b"\xff garbage")
    with pytest.raises(LeaseError, match="PublicIP"):
        Lease.parse("10.100.18.0-24", '{"PublicIP": "nope"}')


def test_check_peers_refuses_what_would_misroute():
    own, network = IPv4Network("10.100.5.0/24"), IPv4Network("10.100.0.0/16")
    ip = IPv4Address("192.0.2.12")
    check_peers(own, network, {IPv4Network("10.100.18.0/24"): ip})
    with pytest.raises(ConfigError, match="our own subnet"):
        check_peers(own, network, {IPv4Network("10.100.5.0/24"): ip})
    with pytest.raises(ConfigError, match="overlaps peer"):
        check_peers(own, network, {IPv4Network("10.100.16.0/20"): ip, IPv4Network("10.100.18.0/24"): ip})
    with pytest.raises(ConfigError, match="outside the network"):
        check_peers(own, network, {IPv4Network("10.200.1.0/24"): ip})


@pytest.mark.parametrize("ip", ["0.0.0.0", "224.0.0.5", "239.255.255.255", "240.0.0.1", "255.255.255.255"])
def test_a_lease_to_an_address_no_host_can_have_cannot_exist(ip):
    with pytest.raises(LeaseError, match=f"PublicIP {ip} is not a unicast address"):
        Lease(IPv4Network("10.100.18.0/24"), IPv4Address(ip))
    with pytest.raises(LeaseError, match=f"lease 10.100.18.0-24: PublicIP '{ip}' is not a unicast address"):
        Lease.parse("10.100.18.0-24", json.dumps({"PublicIP": ip}))


@pytest.mark.parametrize("ip", ["192.0.2.12", "127.0.0.2", "10.0.0.1", "223.255.255.254"])
def test_any_unicast_address_can_be_a_public_ip(ip):
    assert Lease(IPv4Network("10.100.18.0/24"), IPv4Address(ip)).public_ip == IPv4Address(ip)


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
