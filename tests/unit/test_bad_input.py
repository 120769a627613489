"""One table of bad input, through every entry point, and what a user sees.

At start (flags, TUNPROXY_ and FLANNELD_ variables, the net-conf file, the
peers file, backend options): exactly one line on stderr, ``tunproxy: error:``,
naming the input, and exit 2. At run time (a peers file re-read on SIGHUP, a
lease value from etcd, a peer's backend data, a config changed in etcd): one
log line and the previous state kept. Anything unforeseen: one line with a
hint to rerun with ``--log-level debug``.

These run in-process. ``geteuid`` is patched to a non-root uid, so an input
that wrongly passed validation would end at the root check, with a line that
does not name it, and the test would fail instead of starting a daemon.
"""

from __future__ import annotations

import asyncio
import json
import logging
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from tunproxy import cli
from tunproxy.backends import BackendContext, create_backend
from tunproxy.backends.vxlan import VxlanBackend
from tunproxy.daemon import Daemon, DaemonOptions
from tunproxy.etcd.acquire import config_drift
from tunproxy.etcd.values import LeaseDecoder
from tunproxy.model import Lease, NetworkConfig
from tunproxy.netlink import Underlay
from tunproxy.peers.static import StaticRegistry
from tunproxy.watcher import PeerChanges

STATIC = ["run", "--network", "10.100.0.0/16", "--subnet", "10.100.5.0/24", "--subnet-file", ""]
SUBNETS = "/coreos.com/network/subnets/"
UNDERLAY = Underlay("eth1", 2, IPv4Address("192.0.2.11"), 24, 1500)


@pytest.fixture(autouse=True)
def not_root(monkeypatch):
    monkeypatch.setattr(cli.os, "geteuid", lambda: 1000)


def one_line(capsys, argv, environ=None) -> str:
    """Run main; assert exit 2 and exactly one stderr line, an error; return it."""
    code = cli.main(argv, environ or {})
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("tunproxy: error: "), err
    assert "Traceback" not in err
    return lines[0]


# --- flags and variables --------------------------------------------------------------------------
# (flag, bad value, what the line says). Each row runs three ways: on the command line, as
# TUNPROXY_<FLAG> and as FLANNELD_<FLAG>; the line names whichever was used.

FLAG_VALUES = [
    ("--network", "10.100.0.0/33", "is not an IPv4 CIDR"),
    ("--network", "10.100.0.1/16", "has host bits set"),
    ("--network", "fd00::/48", "is IPv6"),
    ("--network", "10.100.0.0", "has no prefix length"),
    ("--subnet", "banana", "is not an IPv4 CIDR"),
    ("--backend", "wireguard", "is not one of udp, vxlan, host-gw"),
    ("--peer", "192.0.2.12:10.100.6.0/24", "must look like 192.0.2.12=10.100.18.0/24"),
    ("--peer", "192.0.2.x=10.100.6.0/24", "is not an IPv4 address"),
    ("--peer", "192.0.2.12=10.100.6.0", "has no prefix length"),
    ("--peer", "0.0.0.0=10.100.6.0/24", "is not a unicast address a host can have"),
    ("--peer", "239.1.1.1=10.100.6.0/24", "is not a unicast address a host can have"),
    ("--iface-regex", "(", "is not a regular expression"),
    ("--iface-can-reach", "gateway", "is not an IPv4 address"),
    ("--public-ip", "192.0.2", "is not an IPv4 address"),
    ("--public-ip", "fd00::1", "is IPv6"),
    ("--public-ip", "255.255.255.255", "is not a unicast address a host can have"),
    ("--ip-masq", "maybe", "is not true or false"),
    ("--port", "abc", "is not a UDP port (1-65535)"),
    ("--port", "70000", "is not a UDP port (1-65535)"),
    ("--port", "0", "is not a UDP port (1-65535)"),
    ("--batch", "0", "must be from 1 to 1024"),
    ("--batch", "lots", "is not an integer"),
    ("--tun-name", "a/b", "is not a device name"),
    ("--tun-name", "sixteen-chars-xx", "is not a device name"),
    ("--no-offload", "perhaps", "is not true or false"),
    ("--without", "warp-drive", "is not a data path feature"),
    ("--refuse", "warp-drive", "is not a data path feature"),
    ("--etcd-endpoints", "ftp://192.0.2.100", "is not a URL like http://192.0.2.100:2379"),
    ("--subnet-lease-ttl", "1d", "is not a number of minutes"),
    ("--subnet-lease-ttl", "0", "must be more than 0 minutes"),
    ("--subnet-lease-ttl", "nan", "must be more than 0 minutes"),
    ("--subnet-lease-renew-margin", "-5", "must be more than 0 minutes"),
    ("--stats-interval", "-1", "must be at least 0 seconds"),
    ("--stats-interval", "often", "is not a number of seconds"),
    ("--check-interval", "0", "must be more than 0 seconds"),
    ("--log-level", "verbose", "is not one of debug, info, warning, error"),
    ("--kube-subnet-mgr", "true", "tunproxy has no Kubernetes subnet manager"),
]


def env_name(prefix: str, flag: str) -> str:
    return prefix + flag.lstrip("-").upper().replace("-", "_")


def static_without(flag: str) -> list[str]:
    """STATIC without ``flag`` and its value, so the variable under test is not overridden."""
    i = STATIC.index(flag) if flag in STATIC else len(STATIC)
    return STATIC[:i] + STATIC[i + 2 :]


@pytest.mark.parametrize("how", ["flag", "TUNPROXY_", "FLANNELD_"])
@pytest.mark.parametrize("flag, value, says", FLAG_VALUES)
def test_a_bad_flag_or_variable_is_one_line_naming_it(capsys, how, flag, value, says):
    base = static_without(flag)
    if how == "flag":
        line = one_line(capsys, [*base, f"{flag}={value}"])
        assert flag in line
    else:
        name = env_name(how, flag)
        line = one_line(capsys, base, {name: value})
        assert name in line
    assert says in line


@pytest.mark.parametrize("command", [["run"], ["leases"]])
def test_etcd_file_and_credential_mistakes_name_their_variable(tmp_path, capsys, command):
    env = {"FLANNELD_ETCD_ENDPOINTS": "http://192.0.2.100:2379"}
    ca = tmp_path / "ca.pem"
    line = one_line(capsys, command, {**env, "FLANNELD_ETCD_CAFILE": str(ca)})
    assert line == f"tunproxy: error: cannot read FLANNELD_ETCD_CAFILE {ca}: No such file or directory"
    line = one_line(capsys, command, {**env, "TUNPROXY_ETCD_CERTFILE": str(ca)})
    assert line == "tunproxy: error: TUNPROXY_ETCD_CERTFILE and --etcd-keyfile go together"
    line = one_line(capsys, command, {**env, "FLANNELD_ETCD_PASSWORD": "secret"})
    assert line == "tunproxy: error: --etcd-username and FLANNELD_ETCD_PASSWORD go together"


def test_the_leases_command_checks_its_flags_and_variables_too(capsys):
    line = one_line(capsys, ["leases"], {"FLANNELD_ETCD_ENDPOINTS": "ftp://x"})
    assert "FLANNELD_ETCD_ENDPOINTS" in line and "is not a URL" in line
    assert "--log-level 'loud'" in one_line(capsys, ["leases", "--log-level", "loud"])


@pytest.mark.parametrize(
    "argv, says",
    [
        (["run", "--nework", "10.100.0.0/16"], "unrecognized arguments: --nework"),
        (["run", "--port"], "argument --port: expected one argument"),
        (["launch"], "invalid choice: 'launch'"),
        ([], "the following arguments are required: command"),
    ],
)
def test_a_malformed_command_line_is_one_line(capsys, argv, says):
    assert says in one_line(capsys, argv)


def test_tunproxy_wins_over_flanneld_and_the_command_line_over_both(capsys):
    env = {"FLANNELD_PORT": "abc", "TUNPROXY_PORT": "8300"}
    args, _ = cli.parse(["run"], env)
    assert (args.port, args.sources["port"]) == (8300, "TUNPROXY_PORT")
    args, _ = cli.parse(["run", "--port", "8400"], {"FLANNELD_PORT": "x", "TUNPROXY_PORT": "y"})
    assert (args.port, args.sources["port"]) == (8400, "--port")
    # the bad one wins when it is the one used
    env = {"FLANNELD_PORT": "8300", "TUNPROXY_PORT": "abc"}
    assert "TUNPROXY_PORT 'abc'" in one_line(capsys, STATIC, env)


def test_flanneld_variables_set_every_flannel_flag_tunproxy_has():
    env = {
        "FLANNELD_ETCD_ENDPOINTS": "http://192.0.2.100:2379",
        "FLANNELD_ETCD_PREFIX": "/my/network",
        "FLANNELD_ETCD_CAFILE": "/ca.pem",
        "FLANNELD_ETCD_CERTFILE": "/cert.pem",
        "FLANNELD_ETCD_KEYFILE": "/key.pem",
        "FLANNELD_ETCD_USERNAME": "u",
        "FLANNELD_ETCD_PASSWORD": "p",
        "FLANNELD_IFACE": "192.0.2.11",
        "FLANNELD_IFACE_REGEX": "^en[a-z]{1,3}[0-9]",  # one regex: not split at its comma
        "FLANNELD_IFACE_CAN_REACH": "192.0.2.1",
        "FLANNELD_PUBLIC_IP": "198.51.100.7",
        "FLANNELD_SUBNET_FILE": "/run/flannel/subnet.env",
        "FLANNELD_IP_MASQ": "true",
        "FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "30",
        "FLANNELD_NET_CONFIG_PATH": "/etc/kube-flannel/net-conf.json",
    }
    args, warnings = cli.parse(["run"], env)
    assert args.etcd_endpoints == "http://192.0.2.100:2379" and args.etcd_prefix == "/my/network"
    assert (args.etcd_cafile, args.etcd_certfile, args.etcd_keyfile) == ("/ca.pem", "/cert.pem", "/key.pem")
    assert (args.etcd_username, args.etcd_password) == ("u", "p")
    assert args.iface == ["192.0.2.11"] and args.iface_regex == ["^en[a-z]{1,3}[0-9]"]
    assert args.iface_can_reach == IPv4Address("192.0.2.1")
    assert args.public_ip == IPv4Address("198.51.100.7")
    assert (args.subnet_file, args.ip_masq, args.subnet_lease_renew_margin) == (
        "/run/flannel/subnet.env",
        True,
        30.0,
    )
    assert args.net_config == "/etc/kube-flannel/net-conf.json"
    assert args.sources["net_config"] == "FLANNELD_NET_CONFIG_PATH"
    assert warnings == []


def test_a_repeated_flag_from_the_environment_is_a_list_and_empty_means_unset():
    args, _ = cli.parse(["run"], {"TUNPROXY_IFACE": "eth9, 192.0.2.11", "FLANNELD_PORT": ""})
    assert args.iface == ["eth9", "192.0.2.11"] and args.port is None


def test_go_style_boolean_flags(capsys):
    args, _ = cli.parse(["run", "--ip-masq=false", "--no-offload"], {})
    assert (args.ip_masq, args.no_offload) == (False, True)
    args, _ = cli.parse(["run", "--ip-masq"], {"FLANNELD_IP_MASQ": "false"})
    assert args.ip_masq is True


def test_flannel_flags_without_effect_are_one_warning_each(capsys):
    env = {"FLANNELD_IPTABLES_RESYNC": "5", "TUNPROXY_PORTT": "1"}
    args, warnings = cli.parse(["run", "--healthz-port", "8080", "--iptables-forward-rules=false"], env)
    assert args.healthz_port == 8080  # flannel's health server flags are real here
    assert sorted(warnings) == [
        "ignoring --iptables-forward-rules: tunproxy writes no iptables rules",
        "ignoring FLANNELD_IPTABLES_RESYNC: tunproxy writes no iptables rules",
        "ignoring TUNPROXY_PORTT: no tunproxy flag is called that",
    ]
    _, warnings = cli.parse(["leases"], {"TUNPROXY_NETWORK": "10.100.0.0/16"})  # a run flag: no typo
    assert warnings == []
    code = cli.main([*STATIC, "--iptables-resync", "5"], {})
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 2
    assert err[0].endswith("WARNING ignoring --iptables-resync: tunproxy writes no iptables rules")
    assert err[1].startswith("tunproxy: error: tunproxy run needs root")


# --- files: the net-conf and the peers file ---------------------------------------------------------

NET_CONFS = [
    ("{", "is not valid JSON"),
    ("[]", "must be a JSON object"),
    ({}, 'has no "Network"'),
    ({"Network": "10.100.0.0/33"}, "Network '10.100.0.0/33' is not an IPv4 CIDR"),
    ({"Network": "fd00::/48"}, "is IPv6"),
    ({"Network": "10.100.0.0/16", "SubnetLen": 31}, "SubnetLen must be /30 or shorter"),
    ({"Network": "10.100.0.0/16", "SubnetLen": "24"}, "SubnetLen must be a non-negative integer"),
    ({"Network": "10.100.0.0/16", "SubnetLen": 17}, "leaves fewer than four subnets"),
    ({"Network": "10.100.0.0/30"}, "is too small"),
    ({"Network": "10.100.0.0/16", "SubnetMin": "10.200.0.0"}, "SubnetMin 10.200.0.0 is not in the range"),
    ({"Network": "10.100.0.0/16", "SubnetMax": "10.100.7.5"}, "SubnetMax 10.100.7.5 is not on a /24"),
    ({"Network": "10.0.0.0/8", "SubnetMin": "10.9.0.0", "SubnetMax": "10.8.0.0"}, "is above SubnetMax"),
    ({"Network": "10.100.0.0/16", "SubnetMin": "ten"}, "SubnetMin 'ten' is not an IPv4 address"),
    ({"Network": "10.100.0.0/16", "EnableIPv4": False}, "EnableIPv4 is false"),
    ({"Network": "10.100.0.0/16", "EnableIPv4": "yes"}, "EnableIPv4 must be true or false"),
    ({"Network": "10.100.0.0/16", "Backend": "vxlan"}, '"Backend" must be a JSON object'),
    ({"Network": "10.100.0.0/16", "Backend": {"Type": "wireguard"}}, "Backend.Type 'wireguard' is not"),
]

BACKEND_OPTIONS = [
    ("udp", {"Port": "8285"}, "Backend.Port must be an integer from 0 to 65535, not '8285'"),
    ("udp", {"Port": 70000}, "Backend.Port must be an integer from 0 to 65535, not 70000"),
    ("vxlan", {"VNI": -1}, "Backend.VNI must be an integer from 0 to 16777215, not -1"),
    ("vxlan", {"VNI": 1.5}, "Backend.VNI must be an integer from 0 to 16777215, not 1.5"),
    ("vxlan", {"Port": True}, "Backend.Port must be an integer from 0 to 65535, not True"),
    ("vxlan", {"GBP": "yes"}, "Backend.GBP must be true or false, not 'yes'"),
    ("vxlan", {"DirectRouting": 1}, "Backend.DirectRouting must be true or false, not 1"),
    ("vxlan", {"Learning": "off"}, "Backend.Learning must be true or false, not 'off'"),
    ("vxlan", {"MTU": 100}, "Backend.MTU must be an integer from 118 to 65535, not 100"),
    ("vxlan", {"MTU": "1400"}, "Backend.MTU must be an integer from 118 to 65535, not '1400'"),
]


def net_conf(tmp_path: Path, doc) -> Path:
    path = tmp_path / "net-conf.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


@pytest.mark.parametrize("how", ["--net-config", "--net-config-path", "FLANNELD_NET_CONFIG_PATH"])
@pytest.mark.parametrize("doc, says", NET_CONFS)
def test_a_bad_net_conf_is_one_line_naming_the_file_and_field(tmp_path, capsys, how, doc, says):
    path = net_conf(tmp_path, doc)
    base = ["run", "--subnet", "10.100.5.0/24", "--subnet-file", ""]
    if how.startswith("--"):
        line = one_line(capsys, [*base, how, str(path)])
        assert f"--net-config {path}: " in line  # named by the flag's first name
    else:
        line = one_line(capsys, base, {how: str(path)})
        assert f"{how} {path}: " in line
    assert says in line


@pytest.mark.parametrize("backend, options, says", BACKEND_OPTIONS)
def test_a_bad_backend_option_is_one_line(tmp_path, capsys, backend, options, says):
    path = net_conf(tmp_path, {"Network": "10.100.0.0/16", "Backend": {"Type": backend, **options}})
    line = one_line(capsys, ["run", "--net-config", str(path), "--subnet", "10.100.5.0/24"])
    assert line == f"tunproxy: error: --net-config {path}: {says}"


def test_an_unreadable_net_conf_names_the_file(tmp_path, capsys):
    missing = tmp_path / "no"
    line = one_line(capsys, ["run", "--subnet", "10.100.5.0/24"], {"TUNPROXY_NET_CONFIG": str(missing)})
    assert line == f"tunproxy: error: cannot read TUNPROXY_NET_CONFIG {missing}: No such file or directory"


PEERS_FILES = [
    ("[{", "is not valid JSON"),
    ({"PublicIP": "192.0.2.12"}, "must be a JSON list"),
    ([{"PublicIP": "192.0.2.12"}], "entry 0 needs PublicIP and Subnet"),
    ([{"PublicIP": "192.0.2.x", "Subnet": "10.100.6.0/24"}], "entry 0 PublicIP '192.0.2.x' is not an IPv4"),
    ([{"PublicIP": "0.0.0.0", "Subnet": "10.100.6.0/24"}], "PublicIP '0.0.0.0' is not a unicast"),
    ([{"PublicIP": "192.0.2.12", "Subnet": "10.100.6.1/24"}], "entry 0 Subnet '10.100.6.1/24' has host bits"),
    ([{"PublicIP": "192.0.2.12", "Subnet": "10.200.6.0/24"}], "is outside the network 10.100.0.0/16"),
    ([{"PublicIP": "192.0.2.12", "Subnet": "10.100.5.0/25"}], "overlaps our own subnet"),
    (
        [
            {"PublicIP": "192.0.2.12", "Subnet": "10.100.6.0/24"},
            {"PublicIP": "192.0.2.13", "Subnet": "10.100.6.0/24"},
        ],
        "peer subnet 10.100.6.0/24 is listed twice",
    ),
]


@pytest.mark.parametrize("doc, says", PEERS_FILES)
def test_a_bad_peers_file_is_one_line(tmp_path, capsys, doc, says):
    path = tmp_path / "peers.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    line = one_line(capsys, STATIC, {"FLANNELD_PEERS_FILE": str(path)})
    assert says in line


def test_an_unexpected_exception_is_one_line_with_a_hint(monkeypatch, capsys):
    def broken(args):
        raise KeyError("Type")

    monkeypatch.setattr(cli, "cmd_run", broken)
    assert cli.main(STATIC, {}) == 1
    err = capsys.readouterr().err.strip().splitlines()
    hint = "(rerun with --log-level debug for the traceback)"
    assert err == [f"tunproxy: error: unexpected KeyError: 'Type' {hint}"]
    assert cli.main([*STATIC, "--log-level", "debug"], {}) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and 'raise KeyError("Type")' in err
    assert err.strip().splitlines()[-1].startswith("tunproxy: error: unexpected KeyError")


# --- net-conf fields tunproxy ignores: one warning each, never silence ------------------------------


def test_ignored_fields_and_options_are_one_warning_each(caplog):
    config = NetworkConfig.parse(
        {
            "Network": "10.100.0.0/16",
            "EnableIPv4": True,
            "EnableIPv6": True,
            "IPv6Network": "fd00::/48",
            "EnableNFTables": True,
            "Networks": ["10.100.0.0/16"],
            "Colour": "blue",
            "Backend": {"Type": "vxlan", "Learning": True, "MacPrefix": "0E-2A", "Mtus": 1400},
        }
    )
    assert config.warnings == (
        "ignoring EnableIPv6: tunproxy carries IPv4 only",
        "ignoring IPv6Network: tunproxy carries IPv4 only",
        "ignoring EnableNFTables: tunproxy's --ip-masq rules are always nftables",
        "ignoring Networks: flannel's MultiClusterCIDR list (Kubernetes only); tunproxy uses Network",
        "ignoring Colour: not a flannel network config field",
        "ignoring Backend.Learning: tunproxy writes every neighbour and FDB entry, learning stays off",
        "ignoring Backend.MacPrefix: flannel uses it on Windows only",
        "ignoring Backend.Mtus: not an option of the vxlan backend",
    )
    caplog.set_level(logging.WARNING, logger="tunproxy")
    create_backend(BackendContext(config, UNDERLAY, UNDERLAY.address))
    logged = [r.getMessage() for r in caplog.records]
    assert logged == [f"network config: {w}" for w in config.warnings]
    quiet = NetworkConfig.parse({"Network": "10.100.0.0/16", "EnableIPv6": False, "EnableNFTables": False})
    assert quiet.warnings == ()


def test_host_gw_and_udp_options_they_do_not_have_are_warned():
    host_gw = NetworkConfig.parse({"Network": "10.100.0.0/16", "Backend": {"Type": "host-gw", "Port": 1}})
    assert host_gw.warnings == ("ignoring Backend.Port: not an option of the host-gw backend",)
    udp = NetworkConfig.parse({"Network": "10.100.0.0/16", "Backend": {"Type": "udp", "VNI": 1}})
    assert udp.warnings == ("ignoring Backend.VNI: not an option of the udp backend",)


def test_backend_flag_drops_the_other_types_options_with_a_warning(tmp_path):
    path = net_conf(tmp_path, {"Network": "10.100.0.0/16", "Backend": {"Type": "vxlan", "VNI": 7}})
    args, _ = cli.parse(["run", "--net-config", str(path), "--backend", "udp"], {})
    config = cli.static_network_config(args)
    assert (config.backend_type, dict(config.backend.raw)) == ("udp", {})
    assert config.warnings == ("ignoring Backend VNI: written for vxlan, --backend is udp",)


# --- run time: one log line, the previous state kept ------------------------------------------------


def test_a_bad_peers_file_on_sighup_keeps_the_previous_peers(tmp_path, caplog):
    path = tmp_path / "peers.json"
    path.write_text(json.dumps([{"PublicIP": "192.0.2.12", "Subnet": "10.100.6.0/24"}]))
    config = NetworkConfig.parse({"Network": "10.100.0.0/16"})
    registry = StaticRegistry(config, IPv4Network("10.100.5.0/24"), {}, path)
    before = registry.current
    caplog.set_level(logging.INFO, logger="tunproxy")
    for bad in ("[{", json.dumps([{"PublicIP": "192.0.2.13", "Subnet": "10.100.5.0/24"}])):
        caplog.clear()
        path.write_text(bad)
        registry.reload()
        assert registry.current == before
        assert [r.levelname for r in caplog.records] == ["ERROR"]
        assert caplog.records[0].getMessage().startswith("peers not reloaded, keeping the previous 1: ")


@pytest.mark.parametrize(
    "key, value, says",
    [
        (f"{SUBNETS}10.100.6.0-24", b"{not json", "is not JSON"),
        (f"{SUBNETS}10.100.6.0-24", b'{"BackendType": "udp"}', "has no PublicIP"),
        (f"{SUBNETS}10.100.6.0-24", b'{"PublicIP": "192.0.2"}', "is not an IPv4 address"),
        (f"{SUBNETS}10.100.6.0-24", b'{"PublicIP": "0.0.0.0"}', "is not a unicast address"),
        (f"{SUBNETS}10.100.6.0-24", b'{"PublicIP": "224.0.0.5"}', "is not a unicast address"),
        (f"{SUBNETS}10.100.6.0-24", b'{"PublicIP": "240.0.0.1"}', "is not a unicast address"),
        (f"{SUBNETS}10.100.6.0-24", b'{"PublicIP": "192.0.2.12", "BackendType": 5}', "must be a string"),
        (f"{SUBNETS}10.100.6.0", b'{"PublicIP": "192.0.2.12"}', "is not of the form"),
        (f"{SUBNETS}10.200.6.0-24", b'{"PublicIP": "192.0.2.12"}', "outside the network"),
    ],
)
def test_a_bad_lease_value_is_one_log_line_and_ignored(key, value, says):
    decoder = LeaseDecoder()
    lease, message = decoder.decode(key, value, IPv4Network("10.100.0.0/16"))
    assert lease is None and message is not None and says in message and key in message
    assert decoder.decode(key, value, IPv4Network("10.100.0.0/16")) == (None, None)  # said once


@pytest.mark.parametrize(
    "data, says",
    [
        (None, "its lease has no VtepMAC in BackendData (None)"),
        ({"VtepMAC": "0e:74"}, "its VtepMAC '0e:74' is not a MAC address"),
        ({"VtepMAC": "ff:ff:ff:ff:ff:ff"}, "its VtepMAC ff:ff:ff:ff:ff:ff is not a unicast address"),
    ],
)
def test_a_peer_with_bad_backend_data_is_one_log_line_and_not_routed(caplog, data, says):
    config = NetworkConfig.parse({"Network": "10.100.0.0/16", "Backend": {"Type": "vxlan"}})
    daemon = Daemon(None, DaemonOptions(iface=None, public_ip=None, subnet_file=None))  # type: ignore[arg-type]
    daemon.backend = backend = VxlanBackend(BackendContext(config, UNDERLAY, UNDERLAY.address))
    lease = Lease(IPv4Network("10.100.6.0/24"), IPv4Address("192.0.2.12"), "vxlan", data)
    caplog.set_level(logging.INFO, logger="tunproxy")
    asyncio.run(daemon._apply(PeerChanges(added=(lease,))))
    assert [r.getMessage() for r in caplog.records] == [f"peer 10.100.6.0/24 (192.0.2.12) refused: {says}"]
    assert backend.peers == {}


@pytest.mark.parametrize(
    "stored, says",
    [
        (b"{", "is now unusable (network config is not valid JSON"),
        (b'{"Network": "10.100.0.0/16", "Backend": {"Type": "vxlan"}}', "Backend.Type changed"),
        (b'{"Network": "10.100.0.0/16", "Backend": {"Port": "x"}}', "unusable (Backend.Port must be"),
        (None, "was deleted from etcd"),
    ],
)
def test_a_config_changed_in_etcd_at_run_time_is_one_line_and_not_applied(stored, says):
    running = NetworkConfig.parse({"Network": "10.100.0.0/16"})
    drift = config_drift(running, stored)
    assert drift is not None and says in drift and "\n" not in drift


# --- files that are not what they say, and inputs named by their variable ---------------------

NOT_UTF8 = b"\xff\xfe[]"


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
