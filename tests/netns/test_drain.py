"""drain (on by default): byte-identical transfers, and interop with a peer that has it off."""

from __future__ import annotations

import pytest

from .labkit import overlay_of as overlay
from .labkit import tcp_both_ways, udp_pair

pytestmark = pytest.mark.root


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "plain"])
def test_drain_peer_and_no_drain_peer_move_tcp_byte_identical_both_ways(offload):
    extra = () if offload else ("--no-offload",)
    with udp_pair(extra, (*extra, "--without", "drain")) as (hosts, drain, plain):
        tcp_both_ways(hosts, 16 << 20)
        # Both ends answer pings through each other: the replies the drain reads straight after
        # its TUN write go out as well as those epoll reports.
        out = hosts["h2"].ping(overlay("h1"), count=5, extra=("-i", "0.05"))
        assert " 0% packet loss" in out.stdout, out.stdout
        assert drain.alive() and plain.alive()
