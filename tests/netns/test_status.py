"""``tunproxy status`` against live daemons in namespaces, over the control socket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunproxy.control import default_socket

from .labkit import HOSTS, build_udp, eventually, overlay_of, start_udp

pytestmark = pytest.mark.root


def tunproxy(*args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "tunproxy", *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)


def status(lab, name: str) -> dict:
    out = tunproxy("status", "--subnet-file", str(lab.workdir / f"{name}-subnet.env"), "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def peer(doc: dict, name: str) -> dict:
    (row,) = [p for p in doc["peers"] if p["subnet"] == HOSTS[name][1]]
    return row


def test_status_lists_peers_whose_counters_move_and_whose_last_seen_grows(lab):
    hosts = build_udp(lab)
    for host in hosts.values():
        start_udp(host)
    h1 = hosts["h1"]
    h1.wait_ping(overlay_of("h2"))
    before = eventually(lambda: status(lab, "h1"), 5, "status")
    assert before["phase"] == "ready" and before["subnet"] == HOSTS["h1"][1]
    assert before["backend"] == "udp" and before["public_ip"] == HOSTS["h1"][0]
    assert before["store"] == {"kind": "static", "peers_file": None, "peers": 2}
    assert sorted(p["subnet"] for p in before["peers"]) == sorted([HOSTS["h2"][1], HOSTS["h3"][1]])
    assert peer(before, "h3")["rx_packets"] == 0 and peer(before, "h3")["last_seen_seconds"] is None

    assert h1.ping(overlay_of("h2"), count=5).returncode == 0
    # The counters are read from the fast path when asked: 5 echo requests out, 5 replies in.
    after = status(lab, "h1")
    h2_before, h2_after = peer(before, "h2"), peer(after, "h2")
    assert h2_after["tx_packets"] - h2_before["tx_packets"] == 5
    assert h2_after["rx_packets"] - h2_before["rx_packets"] == 5
    assert h2_after["tx_bytes"] - h2_before["tx_bytes"] == 5 * 84
    assert peer(after, "h3")["tx_packets"] == 0

    # h2 goes silent: the time since its last packet keeps growing.
    seen = eventually(lambda: peer(status(lab, "h1"), "h2")["last_seen_seconds"], 5, "a last-seen time")
    later = eventually(
        lambda: (s := peer(status(lab, "h1"), "h2")["last_seen_seconds"]) >= seen + 2 and s,
        10,
        "last-seen to grow",
    )
    assert later >= seen + 2

    text = tunproxy("status", "--subnet-file", str(lab.workdir / "h1-subnet.env"))
    assert text.returncode == 0, text.stderr
    assert "state     ready" in text.stdout
    assert f"{HOSTS['h2'][1]}  {HOSTS['h2'][0]}" in text.stdout


def test_status_says_in_one_line_when_no_daemon_runs(lab):
    out = tunproxy("status", "--subnet-file", str(lab.workdir / "nobody-subnet.env"))
    assert out.returncode == 3
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1 and "no tunproxy daemon is running" in out.stderr


def test_only_root_may_ask_and_each_daemon_has_its_own_socket(lab):
    hosts = build_udp(lab, names=("h1", "h2"))
    for host in hosts.values():
        start_udp(host, peers=tuple(n for n in ("h1", "h2") if n != host.name))
    paths = {name: default_socket(lab.workdir / f"{name}-subnet.env") for name in hosts}
    assert paths["h1"] != paths["h2"]
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in paths.values())
    assert status(lab, "h2")["subnet"] == HOSTS["h2"][1]
    out = tunproxy("status", "--control-socket", str(paths["h1"]), user=65534)
    assert out.returncode == 1 and "only root may ask" in out.stderr and "Traceback" not in out.stderr
    for proc in lab.processes:
        proc.stop()
    assert not any(p.exists() for p in paths.values())  # removed on exit


def test_status_watch_redraws_every_second(lab):
    hosts = build_udp(lab, names=("h1",))
    start_udp(hosts["h1"], peers=())
    argv = [sys.executable, "-m", "tunproxy", "status", "--watch", "--json"]
    argv += ["--subnet-file", str(lab.workdir / "h1-subnet.env")]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    watch = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    try:
        first, second = json.loads(watch.stdout.readline()), json.loads(watch.stdout.readline())
    finally:
        watch.terminate()
        watch.wait(10)
    assert first["subnet"] == second["subnet"] == HOSTS["h1"][1]
    assert first["pid"] == second["pid"]
