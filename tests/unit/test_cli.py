"""The command line in-process: flags from the environment, errors as one line."""

from __future__ import annotations

import pytest

from tunproxy import cli


def run_main(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr().err


def test_not_root_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(cli.os, "geteuid", lambda: 1000)
    code, err = run_main(
        ["run", "--network", "10.100.0.0/16", "--subnet", "10.100.5.0/24", "--subnet-file", ""], capsys
    )
    assert code == 2
    assert err.strip() == (
        "tunproxy: error: tunproxy run needs root (CAP_NET_ADMIN) to create devices and routes"
    )


def test_environment_supplies_flags_and_the_command_line_wins(monkeypatch, capsys):
    monkeypatch.setenv("TUNPROXY_NETWORK", "10.100.0.0/16")
    monkeypatch.setenv("TUNPROXY_SUBNET", "10.100.5.0/24")
    monkeypatch.setenv("TUNPROXY_PEER", "192.0.2.12=10.100.5.0/24,192.0.2.13=10.100.7.0/24")
    code, err = run_main(["run", "--subnet-file", ""], capsys)
    assert code == 2 and "192.0.2.12=10.100.5.0/24 overlaps our own subnet" in err
    code, err = run_main(["run", "--subnet-file", "", "--subnet", "10.200.0.0/24"], capsys)
    assert code == 2 and "--subnet 10.200.0.0/24 is outside the network 10.100.0.0/16" in err


def test_net_config_file(tmp_path, monkeypatch, capsys):
    conf = tmp_path / "net-conf.json"
    conf.write_text('{"Network": "10.100.0.0/16", "SubnetLen": 24, "Backend": {"Type": "udp", "Port": 8285}}')
    args, _ = cli.parse(["run", "--net-config", str(conf), "--subnet", "10.100.5.0/24"], {})
    config = cli.static_network_config(args)
    assert str(config.network) == "10.100.0.0/16" and config.backend.raw == {"Port": 8285}
    conf.write_text("{")
    code, err = run_main(["run", "--net-config", str(conf), "--subnet", "10.100.5.0/24"], capsys)
    assert code == 2 and "not valid JSON" in err
    code, err = run_main(["run", "--net-config", str(tmp_path / "nope"), "--subnet", "10.100.5.0/24"], capsys)
    assert code == 2 and "cannot read --net-config" in err


def test_peers_file_errors(tmp_path, capsys):
    peers = tmp_path / "peers.json"
    peers.write_text('[{"PublicIP": "192.0.2.12"}]')
    base = ["run", "--network", "10.100.0.0/16", "--subnet", "10.100.5.0/24", "--subnet-file", ""]
    code, err = run_main([*base, "--peers-file", str(peers)], capsys)
    assert code == 2 and "entry 0 needs PublicIP and Subnet" in err


@pytest.mark.parametrize("flag", ["--batch=0", "--batch=2000", "--port=70000"])
def test_range_checks(flag, capsys):
    base = ["run", "--network", "10.100.0.0/16", "--subnet", "10.100.5.0/24", "--subnet-file", ""]
    code, err = run_main([*base, flag], capsys)
    assert code == 2 and flag.split("=")[0] in err


def test_an_error_inside_the_daemons_task_group_is_still_one_line(monkeypatch, capsys):
    def failing_run(args):
        raise ExceptionGroup(
            "unhandled errors in a TaskGroup", [cli.ConfigError("no free subnet in 10.100.0.0/16")]
        )

    monkeypatch.setattr(cli, "cmd_run", failing_run)
    code, err = run_main(["run"], capsys)
    assert code == 2 and err.strip() == "tunproxy: error: no free subnet in 10.100.0.0/16"


@pytest.mark.parametrize(
    ("argv", "env", "allowed"),
    [
        ([], {}, False),  # anti-spoofing is on by default
        (["--allow-any-source"], {}, True),
        ([], {"TUNPROXY_ALLOW_ANY_SOURCE": "true"}, True),
        (["--allow-any-source=false"], {"FLANNELD_ALLOW_ANY_SOURCE": "true"}, False),
    ],
)
def test_allow_any_source_reaches_the_udp_backend(argv, env, allowed, monkeypatch):
    import uvloop

    from tunproxy import daemon

    seen = {}
    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)
    monkeypatch.setattr(daemon, "Daemon", lambda registry, options: seen.setdefault("options", options))
    monkeypatch.setattr(daemon, "serve", lambda d: None)
    monkeypatch.setattr(uvloop, "run", lambda coro: None)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    base = ["run", "--network", "10.100.0.0/16", "--subnet", "10.100.5.0/24", "--subnet-file", ""]
    assert cli.main(base + argv) == 0
    assert seen["options"].udp.allow_any_source is allowed


def test_static_flags_with_etcd_are_one_warning_each_naming_the_flag_or_variable(caplog):
    import asyncio
    import logging

    from tunproxy.cli_run import make_registry

    argv = ["run", "--etcd-endpoints", "http://192.0.2.100:2379", "--peer", "192.0.2.12=10.100.6.0/24"]
    args, _ = cli.parse(argv, {"TUNPROXY_NETWORK": "10.100.0.0/16", "TUNPROXY_BACKEND": "vxlan"})
    with caplog.at_level(logging.WARNING, logger="tunproxy"):
        registry = make_registry(args)
    asyncio.run(registry.close())
    said = "with --etcd-endpoints, etcd holds the network and the leases"
    assert [r.getMessage() for r in caplog.records] == [
        f"ignoring TUNPROXY_NETWORK: {said}",
        f"ignoring --peer: {said}",
        f"ignoring TUNPROXY_BACKEND: {said}",
    ]


def test_run_takes_version_as_flanneld_does(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.parse(["run", "--version"], {})
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("tunproxy ")
