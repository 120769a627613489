"""tunproxy-cni without namespaces: flannel's config merge, and the plugin's answers to a runtime.

The pure core (tunproxy.cniconf) is checked value by value; the executable is
run as a runtime runs it (CNI_* variables, config on stdin) for every error the
spec defines, so the JSON on stdout and the exit status are what a runtime sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from ipaddress import IPv4Network, ip_network
from pathlib import Path

import pytest

from lab.podlab import flannel_conflist, reference_plugin_dir
from tunproxy import cli, cniconf
from tunproxy.cni import TUNPROXY_SUBNET_FILE
from tunproxy.cniconf import CNIError, delegate_config, load_netconf, parse_environment, parse_subnet_env
from tunproxy.subnetenv import subnet_env

ROOT = Path(__file__).resolve().parents[2]
ENV_TEXT = subnet_env(IPv4Network("10.100.0.0/16"), IPv4Network("10.100.5.0/24"), 1472, False)


def netconf(**extra):
    return load_netconf(
        json.dumps({"cniVersion": "1.0.0", "name": "cbr0", "type": "flannel", **extra}).encode()
    )


def code_of(excinfo) -> int:
    return excinfo.value.code


# --- subnet.env -------------------------------------------------------------------------------------


def test_reads_the_subnet_env_tunproxy_writes():
    env = parse_subnet_env(ENV_TEXT)
    assert env.networks == (ip_network("10.100.0.0/16"),)
    assert env.subnet == ip_network("10.100.5.0/24")  # FLANNEL_SUBNET=10.100.5.1/24, masked as flannel does
    assert (env.mtu, env.ipmasq) == (1472, False)
    masq = subnet_env(IPv4Network("10.100.0.0/16"), IPv4Network("10.100.5.0/24"), 1450, True)
    assert parse_subnet_env(masq).ipmasq is True


def test_several_networks_and_ipv6_as_newer_flannel_writes():
    env = parse_subnet_env(
        "FLANNEL_NETWORK=10.100.0.0/16,10.200.0.0/16\nFLANNEL_SUBNET=10.100.5.1/24\n"
        "FLANNEL_IPV6_NETWORK=fd00::/48\nFLANNEL_IPV6_SUBNET=fd00:0:0:5::1/64\n"
        "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n# a comment\n\n"
    )
    assert [str(n) for n in env.networks] == ["10.100.0.0/16", "10.200.0.0/16"]
    assert str(env.ipv6_subnet) == "fd00:0:0:5::/64"


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "FLANNEL_SUBNET=10.100.5.1/24\nFLANNEL_MTU=1472\n",
            "x.env is missing FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK, FLANNEL_IPMASQ",
        ),
        (ENV_TEXT.replace("FLANNEL_MTU=1472\n", ""), "x.env is missing FLANNEL_MTU"),
        (
            ENV_TEXT.replace("10.100.5.1/24", "10.100.5.1/33"),
            "x.env: FLANNEL_SUBNET=10.100.5.1/33 is not a CIDR",
        ),
        (ENV_TEXT.replace("1472", "lots"), "x.env: FLANNEL_MTU=lots is not an MTU"),
    ],
)
def test_a_bad_subnet_env_is_named(text, message):
    with pytest.raises(CNIError) as e:
        parse_subnet_env(text, "x.env")
    assert e.value.msg == message


# --- the delegate config ----------------------------------------------------------------------------


def test_delegate_defaults_are_flannels():
    conf = netconf(delegate={"hairpinMode": True, "isDefaultGateway": True})
    assert delegate_config(conf, parse_subnet_env(ENV_TEXT)) == {
        "name": "cbr0",
        "cniVersion": "1.0.0",
        "type": "bridge",
        "bridge": "cni0",
        "hairpinMode": True,
        "isDefaultGateway": True,
        "isGateway": True,
        "ipMasq": True,  # FLANNEL_IPMASQ=false: the daemon does not masquerade, so the bridge does
        "mtu": 1472,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": "10.100.5.0/24"}]],
            "routes": [{"dst": "10.100.0.0/16", "gw": "10.100.5.1"}],
        },
    }


def test_ip_masq_is_left_to_the_daemon_when_it_masquerades():
    env = parse_subnet_env(ENV_TEXT.replace("FLANNEL_IPMASQ=false", "FLANNEL_IPMASQ=true"))
    assert delegate_config(netconf(), env)["ipMasq"] is False


def test_what_the_user_sets_in_delegate_wins():
    conf = netconf(delegate={"mtu": 1400, "ipMasq": False, "isGateway": False, "bridge": "mynet0"})
    config = delegate_config(conf, parse_subnet_env(ENV_TEXT))
    assert (config["mtu"], config["ipMasq"], config["isGateway"], config["bridge"]) == (
        1400,
        False,
        False,
        "mynet0",
    )
    other = delegate_config(
        netconf(delegate={"type": "ipvlan", "master": "eth1"}), parse_subnet_env(ENV_TEXT)
    )
    assert other["type"] == "ipvlan" and "isGateway" not in other and "bridge" not in other


def test_ipam_keeps_the_users_keys_but_not_their_ranges():
    conf = netconf(
        ipam={
            "dataDir": "/tmp/x",
            "ranges": [[{"subnet": "192.168.0.0/24"}]],
            "routes": [{"dst": "192.168.9.0/24"}],
        }
    )
    ipam = delegate_config(conf, parse_subnet_env(ENV_TEXT))["ipam"]
    assert ipam == {
        "type": "host-local",
        "dataDir": "/tmp/x",
        "ranges": [[{"subnet": "10.100.5.0/24"}]],
        "routes": [{"dst": "192.168.9.0/24"}, {"dst": "10.100.0.0/16", "gw": "10.100.5.1"}],
    }


def test_runtime_config_and_prev_result_go_to_the_delegate_but_prev_result_is_not_stored():
    prev = {"cniVersion": "1.0.0", "interfaces": [{"name": "lo"}], "ips": []}
    conf = netconf(runtimeConfig={"portMappings": []}, prevResult=prev)
    config = delegate_config(conf, parse_subnet_env(ENV_TEXT))
    assert (config["runtimeConfig"], config["prevResult"]) == ({"portMappings": []}, prev)
    stored = cniconf.stored_config(config)
    assert "prevResult" not in stored and stored["runtimeConfig"] == {"portMappings": []}
    later = {"cniVersion": "1.0.0", "ips": [{"address": "10.100.5.2/24"}]}
    assert cniconf.replay_config(stored, netconf(prevResult=later))["prevResult"] == later
    assert "prevResult" not in cniconf.replay_config(stored, netconf())


@pytest.mark.parametrize(
    "delegate, message",
    [
        ({"name": "x"}, "'delegate' dictionary must not have 'name' field, it is set by the plugin"),
        ({"ipam": {}}, "'delegate' dictionary must not have 'ipam' field, it is set by the plugin"),
        ({"type": 7}, "'delegate' dictionary, if present, must have (string) 'type' field"),
    ],
)
def test_a_delegate_that_sets_what_flannel_sets_is_refused(delegate, message):
    with pytest.raises(CNIError) as e:
        delegate_config(netconf(delegate=delegate), parse_subnet_env(ENV_TEXT))
    assert (code_of(e), e.value.msg) == (cniconf.INVALID_NETWORK_CONFIG, message)


# --- the network config and the environment ---------------------------------------------------------


def test_netconf_defaults_are_flannels_paths():
    conf = netconf()
    assert (str(conf.subnet_file), str(conf.data_dir)) == ("/run/flannel/subnet.env", "/var/lib/cni/flannel")


@pytest.mark.parametrize(
    "data, code, fragment",
    [
        (b'{"name": "x"', 6, "network config on stdin is not JSON"),
        (b"[1, 2]", 6, "not a JSON object"),
        (b'{"cniVersion": "9.9.9", "name": "x"}', 1, "incompatible CNI versions"),
        (b'{"cniVersion": "1.0.0"}', 7, "network config has no 'name'"),
        (b'{"cniVersion": "1.0.0", "name": "x", "subnetFile": 5}', 7, "'subnetFile' must be a path, not 5"),
        (b'{"cniVersion": "1.0.0", "name": "x", "delegate": "bridge"}', 7, "'delegate' must be an object"),
    ],
)
def test_a_bad_netconf_gets_the_specs_code(data, code, fragment):
    with pytest.raises(CNIError) as e:
        load_netconf(data)
    assert code_of(e) == code and fragment in e.value.msg


BASE_ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "abc",
    "CNI_NETNS": "/run/netns/x",
    "CNI_IFNAME": "eth0",
    "CNI_PATH": "/a:/b",
}


def test_environment():
    inv = parse_environment(BASE_ENV)
    assert (inv.command, inv.container_id, inv.ifname, inv.path) == ("ADD", "abc", "eth0", ("/a", "/b"))
    assert parse_environment({**BASE_ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""}).netns == ""


@pytest.mark.parametrize(
    "change, message",
    [
        ({"CNI_NETNS": "", "CNI_PATH": ""}, "required env variables [CNI_NETNS,CNI_PATH] missing"),
        ({"CNI_COMMAND": "GC"}, "unknown CNI_COMMAND: GC"),
        ({"CNI_CONTAINERID": "../../etc/passwd"}, "invalid characters in CNI_CONTAINERID"),
        ({"CNI_IFNAME": "eth0/x"}, "invalid CNI_IFNAME 'eth0/x'"),
        ({"CNI_IFNAME": "a-very-long-ifname"}, "invalid CNI_IFNAME 'a-very-long-ifname'"),
    ],
)
def test_bad_environment_is_code_4_naming_the_variable(change, message):
    with pytest.raises(CNIError) as e:
        parse_environment({**BASE_ENV, **change})
    assert (code_of(e), e.value.msg) == (4, message)


# --- the executable, as a runtime runs it -----------------------------------------------------------


def plugin(config, tmp_path, command="ADD", argv=("-m", "tunproxy.cni"), **env):
    """Run the plugin like a runtime; (exit status, parsed stdout or None, stderr)."""
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **BASE_ENV, "CNI_COMMAND": command}
    environ["CNI_PATH"] = str(tmp_path / "empty-bin")
    environ.update(env)
    data = config if isinstance(config, bytes) else json.dumps(config).encode()
    proc = subprocess.run(
        [sys.executable, *argv], input=data, capture_output=True, env=environ, timeout=30, cwd=tmp_path
    )
    out = proc.stdout.decode()
    assert "Traceback" not in proc.stderr.decode()
    return proc.returncode, (json.loads(out) if out.strip() else None), proc.stderr.decode()


@pytest.fixture
def setup(tmp_path):
    (tmp_path / "empty-bin").mkdir()
    (tmp_path / "subnet.env").write_text(ENV_TEXT)
    return {
        "cniVersion": "1.0.0",
        "name": "cbr0",
        "type": "flannel",
        "subnetFile": str(tmp_path / "subnet.env"),
        "dataDir": str(tmp_path / "data"),
        "ipam": {"dataDir": str(tmp_path / "ipam")},
    }


def assert_error(result, code, fragment):
    status, out, err = result
    assert status == 1, result
    assert out["code"] == code and fragment in out["msg"], out
    assert set(out) <= {"cniVersion", "code", "msg", "details"}
    assert err.strip().splitlines() == [f"tunproxy-cni: error: {out['msg']}"]


def test_version_through_the_console_script_entry_point(tmp_path):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["tunproxy-cni"] == "tunproxy.cni:main"
    status, out, _ = plugin(b"", tmp_path, "VERSION", argv=("-c", "from tunproxy.cni import main; main()"))
    assert status == 0
    assert out == {
        "cniVersion": "1.0.0",
        "supportedVersions": ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"],
    }


def test_no_subnet_env_asks_whether_tunproxy_runs(tmp_path, setup):
    (tmp_path / "subnet.env").unlink()
    assert_error(
        plugin(setup, tmp_path),
        11,
        f"{tmp_path}/subnet.env does not exist: is tunproxy running on this host?",
    )
    default = {k: v for k, v in setup.items() if k != "subnetFile"}
    status, out, _ = plugin(default, tmp_path)
    if not Path("/run/flannel/subnet.env").exists():
        assert status == 1 and 'tunproxy writes /run/tunproxy/subnet.env: set "subnetFile"' in out["msg"]
    assert not (tmp_path / "data").exists()


def test_malformed_config_is_a_decoding_error(tmp_path, setup):
    assert_error(
        plugin(b'{"cniVersion": "1.0.0", "name": ', tmp_path), 6, "network config on stdin is not JSON"
    )


def test_missing_delegate_plugin_leaves_nothing_stored(tmp_path, setup):
    assert_error(
        plugin(setup, tmp_path), 999, f'failed to find plugin "bridge" in path [{tmp_path}/empty-bin]'
    )
    assert not (tmp_path / "data" / "abc").exists()
    # And DEL for it (the runtime cleans up after a failed ADD) succeeds with nothing to undo.
    assert plugin(setup, tmp_path, "DEL") == (0, None, "")


def test_invalid_delegate_and_versions(tmp_path, setup):
    assert_error(plugin({**setup, "delegate": {"name": "x"}}, tmp_path), 7, "must not have 'name' field")
    assert_error(plugin({**setup, "cniVersion": "2.0.0"}, tmp_path), 1, "incompatible CNI versions")
    assert_error(
        plugin({**setup, "cniVersion": "0.3.1"}, tmp_path, "CHECK"), 1, "config version does not allow CHECK"
    )
    assert_error(plugin(setup, tmp_path, CNI_CONTAINERID="a/b"), 4, "invalid characters in CNI_CONTAINERID")


def test_check_of_an_unknown_container_is_code_3(tmp_path, setup):
    assert_error(plugin(setup, tmp_path, "CHECK"), 3, "no network config stored for container abc")


def test_check_compares_the_stored_subnet_with_subnet_env(tmp_path, setup):
    (tmp_path / "data").mkdir()
    stored = delegate_config(netconf(), parse_subnet_env(ENV_TEXT))
    (tmp_path / "data" / "abc").write_text(json.dumps(stored))
    (tmp_path / "subnet.env").write_text(ENV_TEXT.replace("10.100.5.1/24", "10.100.9.1/24"))
    assert_error(
        plugin(setup, tmp_path, "CHECK"),
        999,
        "the pod's addresses are from 10.100.5.0/24, but this host's subnet is now 10.100.9.0/24",
    )
    # Same subnet: on to the delegate (absent here). No subnet.env: the same, the daemon may be restarting.
    (tmp_path / "subnet.env").write_text(ENV_TEXT)
    assert_error(plugin(setup, tmp_path, "CHECK"), 999, 'failed to find plugin "bridge"')
    (tmp_path / "subnet.env").unlink()
    assert_error(plugin(setup, tmp_path, "CHECK"), 999, 'failed to find plugin "bridge"')


def test_a_stored_config_that_does_not_parse_does_not_block_del(tmp_path, setup):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "abc").write_text("{garbage")
    status, out, err = plugin(setup, tmp_path, "DEL")
    assert (status, out) == (0, None) and "is not JSON" in err and "; ignored" in err
    assert not (tmp_path / "data" / "abc").exists()


@pytest.mark.skipif(reference_plugin_dir() is None, reason="needs containernetworking-plugins")
def test_the_delegates_error_comes_back_with_its_code(tmp_path, setup):
    bin_dir = str(reference_plugin_dir())
    result = plugin(setup, tmp_path, CNI_PATH=bin_dir, CNI_NETNS="/nonexistent/netns")
    assert_error(
        result,
        result[1]["code"],
        'failed to delegate ADD to bridge: failed to open netns "/nonexistent/netns"',
    )
    stored = json.loads((tmp_path / "data" / "abc").read_text())  # kept for the runtime's DEL
    assert stored["ipam"]["ranges"] == [[{"subnet": "10.100.5.0/24"}]]
    env = {**os.environ, **BASE_ENV, "CNI_PATH": bin_dir, "CNI_NETNS": "/nonexistent/netns"}
    direct = subprocess.run(
        [f"{bin_dir}/bridge"], input=json.dumps(stored).encode(), capture_output=True, env=env, timeout=30
    )
    bridge_error = json.loads(direct.stdout)
    assert result[1]["code"] == bridge_error["code"]
    assert result[1]["msg"] == f"failed to delegate ADD to bridge: {bridge_error['msg']}"


def test_the_shipped_conflist_is_kube_flannels_reading_tunproxys_subnet_file():
    shipped = json.loads((ROOT / "contrib" / "cni" / "10-tunproxy.conflist").read_text())
    flannel, portmap = shipped["plugins"]
    assert flannel["subnetFile"] == cli.DEFAULT_SUBNET_FILE == TUNPROXY_SUBNET_FILE
    assert portmap == {"type": "portmap", "capabilities": {"portMappings": True}}
    conf = load_netconf(
        json.dumps({**flannel, "name": shipped["name"], "cniVersion": shipped["cniVersion"]}).encode()
    )
    assert conf.delegate == {"hairpinMode": True, "isDefaultGateway": True}
    # The lab's list (what the namespace tests and the demo run) is this one with state moved.
    lab = flannel_conflist(Path("/s"), Path("/d"), Path("/i"))
    lab_flannel = {k: v for k, v in lab["plugins"][0].items() if k not in ("subnetFile", "dataDir", "ipam")}
    assert {**lab, "plugins": [lab_flannel, lab["plugins"][1]]} == {
        **shipped,
        "plugins": [{k: v for k, v in flannel.items() if k != "subnetFile"}, portmap],
    }
