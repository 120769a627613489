"""drain (on by default): byte-identical transfers, and interop with a peer that has it off."""

from __future__ import annotations

import pytest

from lab.netns import Lab, transfer

from .labkit import build_udp, start_udp
from .labkit import overlay_of as overlay

pytestmark = pytest.mark.root


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "plain"])
def test_drain_peer_and_no_drain_peer_move_tcp_byte_identical_both_ways(offload):
    with Lab() as lab:
        hosts = build_udp(lab, names=("h1", "h2"))
        extra = () if offload else ("--no-offload",)
        drain = start_udp(hosts["h1"], *extra, peers=("h2",))
        plain = start_udp(hosts["h2"], *extra, "--without", "drain", peers=("h1",))
        hosts["h1"].wait_ping(overlay("h2"), timeout=10)
        sent, received = transfer(hosts["h1"], hosts["h2"], overlay("h2"), 16 << 20)
        assert received == sent
        sent, received = transfer(hosts["h2"], hosts["h1"], overlay("h1"), 16 << 20)
        assert received == sent
        # Both ends answer pings through each other: the replies the drain reads straight after
        # its TUN write go out as well as those epoll reports.
        out = hosts["h2"].ping(overlay("h1"), count=5, extra=("-i", "0.05"))
        assert " 0% packet loss" in out.stdout, out.stdout
        assert drain.alive() and plain.alive()
