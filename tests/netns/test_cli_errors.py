"""Bad input ends in one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lab.hosts import HOSTS, SEGMENT, UNDERLAY
from lab.netns import Lab

BASE = ["--network", "10.100.0.0/16", "--subnet", "10.100.5.0/24", "--iface", "eth1", "--subnet-file", ""]


def run(argv, ns=None, prefix=(), timeout=20, env=None):
    cmd = [*prefix, sys.executable, "-m", "tunproxy", "run", *argv]
    if ns:
        cmd = ns.cmd(*cmd)
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=os.getcwd(),
        env=dict(os.environ, PYTHONPATH=os.getcwd(), **(env or {})),
    )


def assert_one_line(result, fragment):
    """Exactly one error line, the last one, naming the problem; no traceback."""
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == [lines[-1]], result.stderr
    assert lines[-1].startswith("tunproxy: error: ") and fragment in lines[-1], result.stderr


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--network", "10.100.0.0/33", "--subnet", "10.100.5.0/24"], "not an IPv4 CIDR"),
        (["--network", "10.100.0.0/16", "--subnet", "10.200.5.0/24"], "outside the network"),
        (["--network", "10.100.0.0/16", "--subnet", "10.100.5.7/24"], "host bits set"),
        (
            [
                "--network",
                "10.100.0.0/16",
                "--subnet",
                "10.100.5.0/24",
                "--peer",
                "192.0.2.12=10.100.18.0/24",
                "--peer",
                "192.0.2.13=10.100.18.0/23",
            ],
            "overlaps",
        ),
        (
            ["--network", "10.100.0.0/16", "--subnet", "10.100.5.0/24", "--peer", "192.0.2.12=10.100.5.0/24"],
            "overlaps our own subnet",
        ),
        (
            ["--network", "10.100.0.0/16", "--subnet", "10.100.5.0/24", "--peer", "192.0.2.12:10.100.6.0/24"],
            "must look like",
        ),
        (["--subnet", "10.100.5.0/24"], "--network"),
        (["--network", "10.100.0.0/16", "--subnet", "10.100.5.0/24", "--batch", "0"], "--batch"),
    ],
)
def test_bad_input_is_one_line(argv, fragment):
    assert_one_line(run([*argv, "--subnet-file", ""]), fragment)


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"TUNPROXY_PORT": "abc"}, "TUNPROXY_PORT 'abc' is not a UDP port (1-65535)"),
        ({"TUNPROXY_SUBNET_LEASE_TTL": "1d"}, "TUNPROXY_SUBNET_LEASE_TTL '1d' is not a number of minutes"),
        ({"FLANNELD_IP_MASQ": "yes please"}, "FLANNELD_IP_MASQ 'yes please' is not true or false"),
        ({"FLANNELD_IFACE_CAN_REACH": "gw"}, "FLANNELD_IFACE_CAN_REACH 'gw' is not an IPv4 address"),
    ],
)
def test_a_bad_environment_variable_is_one_line(env, fragment):
    result = run(["--network", "10.100.0.0/16", "--subnet", "10.100.5.0/24", "--subnet-file", ""], env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"tunproxy: error: {fragment}"]


@pytest.mark.root
def test_missing_interface_no_tun_and_port_in_use():
    with Lab() as lab:
        lab.segment(SEGMENT, UNDERLAY)
        host = lab.add_host("h1", SEGMENT, HOSTS["h1"].public_ip)
        assert_one_line(
            run([*BASE[:4], "--iface", "eth9", "--subnet-file", ""], ns=host.ns),
            "interface 'eth9' does not exist",
        )
        no_tun = ("unshare", "-m", "sh", "-c", 'mount -t tmpfs none /dev/net && exec "$@"', "--")
        assert_one_line(run(BASE, ns=host.ns, prefix=no_tun), "/dev/net/tun")
        blocker = host.start(
            sys.executable,
            "-c",
            "import socket,time; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
            "s.bind(('192.0.2.11',8285)); print('bound',flush=True); time.sleep(60)",
        )
        blocker.wait_for("bound")
        assert_one_line(run(BASE, ns=host.ns), "UDP port 8285 on 192.0.2.11 is already in use")
        assert "tunproxy0" not in host.ns.run("ip", "link").stdout  # nothing left behind
        # --iface by IP is flannel's too: an address no interface holds is named as such.
        assert_one_line(
            run([*BASE[:4], "--iface", "192.0.2.99", "--subnet-file", ""], ns=host.ns),
            "no interface has the address 192.0.2.99",
        )
