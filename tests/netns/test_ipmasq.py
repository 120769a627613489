"""--ip-masq: pods reach a host outside the overlay with the host's address, each other with their own."""

from __future__ import annotations

import pytest

from .labkit import HOSTS, build_udp, eventually, overlay_of, start_udp

pytestmark = pytest.mark.root

LISTEN = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.bind(('{addr}', 7777))\n"
    "print('listening', flush=True)\n"
    "while True:\n"
    "    data, peer = s.recvfrom(100)\n"
    "    print('from', peer[0], data.decode(), flush=True)\n"
)


def send_from_pod(host, src: str, dst: str, tag: str) -> None:
    host.ns.run(
        "python3",
        "-c",
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        f"s.bind(('{src}', 0)); s.sendto(b'{tag}', ('{dst}', 7777))",
    )


def table_exists(host) -> bool:
    return host.ns.run("nft", "list", "table", "ip", "tunproxy", check=False).returncode == 0


def test_ip_masq_hides_pods_from_the_outside_only_and_is_kept_and_removed(lab):
    hosts = build_udp(lab, names=("h1", "h2"), stranger=True)
    h1, h2, outside = hosts["h1"], hosts["h2"], hosts["h9"]
    proc = start_udp(h1, "--ip-masq", "--check-interval", "1", peers=("h2",))
    start_udp(h2, peers=("h1",))
    h1.wait_ping(overlay_of("h2"))
    listeners = {}
    for name, host, addr in (("outside", outside, str(outside.address)), ("h2", h2, overlay_of("h2"))):
        listeners[name] = host.start("python3", "-c", LISTEN.format(addr=addr), name="listen")
        listeners[name].wait_for("listening")
    pod = overlay_of("h1")

    send_from_pod(h1, pod, str(outside.address), "out1")
    listeners["outside"].wait_for("out1")
    assert f"from {HOSTS['h1'][0]} out1" in listeners["outside"].output()  # masqueraded
    send_from_pod(h1, pod, overlay_of("h2"), "pod1")
    listeners["h2"].wait_for("pod1")
    assert f"from {pod} pod1" in listeners["h2"].output()  # the pod's own source

    h1.ns.run("nft", "delete", "table", "ip", "tunproxy")
    assert not table_exists(h1)
    eventually(lambda: table_exists(h1), 10, "the periodic check to restore the table")
    proc.wait_for("was deleted; restoring it")
    send_from_pod(h1, pod, str(outside.address), "out2")
    listeners["outside"].wait_for("out2")
    assert f"from {HOSTS['h1'][0]} out2" in listeners["outside"].output()

    assert proc.stop() == 0
    assert not table_exists(h1)
    assert "FLANNEL_IPMASQ=true" in (lab.workdir / "h1-subnet.env").read_text()


def test_without_ip_masq_the_outside_sees_the_pod(lab):
    hosts = build_udp(lab, names=("h1",), stranger=True)
    h1, outside = hosts["h1"], hosts["h9"]
    start_udp(h1, peers=())
    listener = outside.start("python3", "-c", LISTEN.format(addr=outside.address), name="listen")
    listener.wait_for("listening")
    send_from_pod(h1, overlay_of("h1"), str(outside.address), "plain")
    listener.wait_for("plain")
    assert f"from {overlay_of('h1')} plain" in listener.output()
    assert not table_exists(h1)
