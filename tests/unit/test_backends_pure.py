"""The vxlan and host-gw backends' pure decisions: options, MACs, peers, direct routes."""

from __future__ import annotations

import dataclasses
import errno
import logging
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunproxy.backend_config import VXLAN_DEFAULT_PORT, UdpFlags, UdpOptions, UdpSettings, VxlanOptions
from tunproxy.backends import BackendContext, backend_class, create_backend
from tunproxy.backends.base import PeerRefused
from tunproxy.backends.rules import (
    VxlanSettings,
    device_name,
    fit_routes,
    host_gw_refusal,
    link_mismatch,
    peer_vtep_mac,
    routes_directly,
    vtep_mac,
)
from tunproxy.backends.vxlan import VxlanBackend
from tunproxy.fastpath import UdpGsoDisabled
from tunproxy.model import ConfigError, Lease, NetworkConfig
from tunproxy.netlink import Underlay

UNDERLAY = Underlay("eth1", 2, IPv4Address("192.0.2.11"), 24, 1500)
SUBNET = IPv4Network("10.100.18.0/24")


def lease(data, ip="192.0.2.12", backend="vxlan") -> Lease:
    return Lease(SUBNET, IPv4Address(ip), backend, data)


def settle(raw, underlay_mtu) -> VxlanSettings:
    return VxlanSettings.settle(VxlanOptions.parse(raw), underlay_mtu)


# --- options ---------------------------------------------------------------------------------------


def test_defaults_are_flannels():
    o = settle({}, 1500)
    assert (o.vni, o.port, o.gbp, o.direct_routing, o.mtu) == (1, 8472, False, False, 1450)


def test_mtu_default_follows_the_underlay():
    assert settle({}, 9000).mtu == 8950


def test_options_are_read():
    o = settle({"VNI": 42, "Port": 4789, "GBP": True, "DirectRouting": True, "MTU": 1400}, 1500)
    assert (o.vni, o.port, o.gbp, o.direct_routing, o.mtu) == (42, 4789, True, True, 1350)


@pytest.mark.parametrize(
    "mtu, underlay, device, clamped",
    [
        (1400, 1500, 1350, None),  # flannel's MTU is the encapsulated packets': the device gets 50 less
        (1500, 1500, 1450, None),  # the underlay's own MTU is allowed, as in flannel
        (9000, 1500, 1450, 9000),  # more than the underlay carries: lowered to it, with a warning
        (118, 1500, 68, None),  # the smallest: a 68-byte IPv4 link inside
    ],
)
def test_mtu_is_flannels_encapsulated_mtu(mtu, underlay, device, clamped):
    o = settle({"MTU": mtu}, underlay)
    assert (o.mtu, o.clamped_from) == (device, clamped)


def test_port_zero_means_the_default():
    assert settle({"Port": 0}, 1500).port == VXLAN_DEFAULT_PORT


@pytest.mark.parametrize(
    "options, message",
    [
        ({"VNI": "1"}, "Backend.VNI must be an integer from 0 to 16777215, not '1'"),
        ({"VNI": 1 << 24}, "Backend.VNI must be an integer"),
        ({"VNI": -1}, "Backend.VNI must be an integer"),
        ({"VNI": True}, "Backend.VNI must be an integer"),
        ({"VNI": 1.5}, "Backend.VNI must be an integer"),
        ({"Port": 65536}, "Backend.Port must be an integer from 0 to 65535"),
        ({"GBP": "true"}, "Backend.GBP must be true or false, not 'true'"),
        ({"GBP": 1}, "Backend.GBP must be true or false, not 1"),
        ({"DirectRouting": "no"}, "Backend.DirectRouting must be true or false"),
        ({"MTU": 117}, "Backend.MTU must be an integer from 118 to 65535, not 117"),
        ({"MTU": "1400"}, "Backend.MTU must be an integer from 118 to 65535, not '1400'"),
        ({"Learning": "yes"}, "Backend.Learning must be true or false"),
    ],
)
def test_bad_options_are_config_errors_naming_the_key(options, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")):
        VxlanOptions.parse(options)


def test_tiny_underlay_mtu_is_refused():
    with pytest.raises(ConfigError, match="underlay MTU 100 is too small"):
        settle({}, 100)


def test_bad_options_fail_when_the_config_is_read():
    with pytest.raises(ConfigError, match="Backend.VNI"):
        NetworkConfig.parse({"Network": "10.100.0.0/16", "Backend": {"Type": "vxlan", "VNI": "x"}})


def test_an_mtu_too_large_for_the_underlay_fails_when_the_backend_is_made():
    config = NetworkConfig.parse({"Network": "10.100.0.0/16", "Backend": {"Type": "vxlan"}})
    tiny = dataclasses.replace(UNDERLAY, mtu=100)
    with pytest.raises(ConfigError, match="underlay MTU 100 is too small"):
        create_backend(BackendContext(config, tiny, UNDERLAY.address))


def test_backend_mtu_and_data():
    config = NetworkConfig.parse({"Network": "10.100.0.0/16", "Backend": {"Type": "vxlan", "VNI": 7}})
    backend = VxlanBackend(BackendContext(config, UNDERLAY, IPv4Address("192.0.2.11")))
    assert backend.mtu == 1450
    assert backend.device == "tunproxy.7"
    assert backend.backend_data == {"VNI": 7, "VtepMAC": "0e:74:c0:00:02:0b"}


# --- names and MACs --------------------------------------------------------------------------------


def test_device_name_fits_ifnamsiz():
    assert device_name(1) == "tunproxy.1"
    assert device_name(999999) == "tunproxy.999999"
    assert device_name(16777215) == "tpvx.16777215"
    assert all(len(device_name(v)) <= 15 for v in (0, 10**6, (1 << 24) - 1))


def test_vtep_mac_is_the_address_behind_a_local_prefix():
    assert vtep_mac(IPv4Address("192.0.2.11")) == "0e:74:c0:00:02:0b"


@given(st.integers(0, (1 << 32) - 1))
def test_vtep_mac_is_locally_administered_unicast_and_round_trips(n):
    mac = vtep_mac(IPv4Address(n))
    first = int(mac[:2], 16)
    assert first & 0b10 and not first & 0b01
    assert IPv4Address(bytes.fromhex(mac.replace(":", ""))[2:]) == IPv4Address(n)
    assert peer_vtep_mac(lease({"VtepMAC": mac})) == mac


@given(st.integers(0, (1 << 32) - 1), st.integers(0, (1 << 32) - 1))
def test_vtep_macs_of_different_hosts_differ(a, b):
    assert (vtep_mac(IPv4Address(a)) == vtep_mac(IPv4Address(b))) == (a == b)


def test_static_backend_data_hook():
    cls = backend_class("vxlan")
    plain = NetworkConfig.parse({"Network": "10.100.0.0/16", "Backend": {"Type": "vxlan"}})
    data = cls.static_backend_data(IPv4Address("192.0.2.12"), plain)
    assert data == {"VNI": 1, "VtepMAC": "0e:74:c0:00:02:0c"}
    config = NetworkConfig.parse({"Network": "10.100.0.0/16", "Backend": {"Type": "vxlan", "VNI": 9}})
    assert cls.static_backend_data(IPv4Address("192.0.2.12"), config)["VNI"] == 9
    host_gw = NetworkConfig.parse({"Network": "10.100.0.0/16", "Backend": {"Type": "host-gw"}})
    assert backend_class("host-gw").static_backend_data(IPv4Address("192.0.2.12"), host_gw) is None


# --- peers -----------------------------------------------------------------------------------------


def test_peer_mac_is_read_and_lowercased():
    assert peer_vtep_mac(lease({"VNI": 1, "VtepMAC": "0E:74:C0:00:02:0C"})) == "0e:74:c0:00:02:0c"


@pytest.mark.parametrize(
    "data, reason",
    [
        (None, "its lease has no VtepMAC in BackendData (None)"),
        ("garbage", "its lease has no VtepMAC in BackendData (garbage)"),
        ({"VNI": 1}, "its lease has no VtepMAC"),
        ({"VtepMAC": 17}, "its VtepMAC 17 is not a MAC address"),
        ({"VtepMAC": "0e:74:c0:00:02"}, "is not a MAC address"),
        ({"VtepMAC": "0e:74:c0:00:02:0g"}, "is not a MAC address"),
        ({"VtepMAC": " e:74:c0:00:02:0c"}, "is not a MAC address"),
        ({"VtepMAC": "01:00:5e:00:00:01"}, "is not a unicast address"),
        ({"VtepMAC": "ff:ff:ff:ff:ff:ff"}, "is not a unicast address"),
        ({"VtepMAC": "00:00:00:00:00:00"}, "is not a unicast address"),
    ],
)
def test_garbage_backend_data_is_refused_with_a_reason(data, reason):
    with pytest.raises(PeerRefused, match=reason.replace("(", r"\(").replace(")", r"\)")):
        peer_vtep_mac(lease(data))


@pytest.mark.parametrize(
    "ip, direct",
    [
        ("192.0.2.12", True),
        ("192.0.2.254", True),
        ("192.0.2.11", False),  # ourselves
        ("198.51.100.12", False),  # behind a router
        ("192.0.3.12", False),
    ],
)
def test_direct_routing_only_on_the_underlay_subnet(ip, direct):
    assert routes_directly(IPv4Address(ip), UNDERLAY) is direct


@given(st.integers(0, (1 << 32) - 1), st.integers(8, 30))
def test_direct_routing_matches_a_brute_force_prefix_compare(n, plen):
    underlay = Underlay("eth1", 2, IPv4Address("10.1.2.3"), plen, 1500)
    ip = IPv4Address(n)
    same = (n >> (32 - plen)) == (int(underlay.address) >> (32 - plen))
    assert routes_directly(ip, underlay) is (same and ip != underlay.address)


def test_host_gw_refuses_a_peer_off_the_segment():
    assert host_gw_refusal(IPv4Address("192.0.2.12"), UNDERLAY) is None
    assert host_gw_refusal(IPv4Address("198.51.100.12"), UNDERLAY) == (
        "host-gw needs peers on one L2 segment; 198.51.100.12 is not in 192.0.2.0/24"
    )
    assert "our own address" in (host_gw_refusal(IPv4Address("192.0.2.11"), UNDERLAY) or "")


def test_host_gw_mtu_is_the_underlays():
    config = NetworkConfig.parse({"Network": "10.100.0.0/16", "Backend": {"Type": "host-gw"}})
    backend = backend_class("host-gw")(BackendContext(config, UNDERLAY, UNDERLAY.address))
    assert backend.mtu == 1500
    assert backend.backend_data is None


# --- device reuse ----------------------------------------------------------------------------------


def test_link_mismatch_lists_each_difference():
    want = {"kind": "vxlan", "vni": 1, "port": 8472, "local": "192.0.2.11", "link": 2, "gbp": False}
    assert link_mismatch(dict(want), want) == []
    have = dict(want, port=4789, gbp=True)
    assert link_mismatch(have, want) == ["port 4789 != 8472", "gbp True != False"]
    assert link_mismatch({"kind": "bridge"}, want)[0] == "kind 'bridge' != 'vxlan'"


# --- udp's port: the command line, else Backend.Port, else flannel's 8285 ---------------------------

ONE_PORT = "every host must use one port"


@pytest.mark.parametrize(
    "options, flag, expected",
    [
        ({}, None, (8285, None)),
        ({"Port": 0}, None, (8285, None)),  # 0 is flannel's "unset"
        ({"Port": 9000}, None, (9000, None)),
        ({}, 9100, (9100, None)),
        ({"Port": 9100}, 9100, (9100, None)),
        ({"Port": 9000}, 9100, (9100, f"TUNPROXY_PORT 9100 overrides Backend.Port 9000; {ONE_PORT}")),
    ],
)
def test_udp_port_precedence(options, flag, expected):
    flags = UdpFlags(port=flag, sources={"port": "TUNPROXY_PORT"})
    assert flags.port_for(UdpOptions.parse(options)) == expected


# --- the udp backend's settings, settled once -------------------------------------------------------


def udp_settings(cpus: int | None = 2, subnets: int = 256, options: dict | None = None, **flags):
    return UdpSettings.resolve(UdpOptions.parse(options or {}), UdpFlags(**flags), cpus=cpus, subnets=subnets)


def test_udp_settings_default_to_every_speed_up_and_flannels_port():
    s = udp_settings()
    assert (s.port, s.batch, s.offload, s.workers, s.warnings) == (8285, 64, True, 1, ())
    assert s.c_loop and s.drain and s.fast_csum and s.simd and s.uso and s.flow_steering


@pytest.mark.parametrize(
    "subnets, flag, expected", [(256, 0, 4096), (1 << 16, 0, 1 << 16), (1 << 24, 0, 1 << 20), (256, 10, 10)]
)
def test_udp_max_routes_is_every_subnet_of_the_network_unless_given(subnets, flag, expected):
    assert udp_settings(subnets=subnets, max_routes=flag).max_routes == expected


@pytest.mark.parametrize(
    "cpus, flags, expected",
    [
        (2, {}, 1),
        (8, {}, 4),
        (None, {}, 1),
        (2, {"workers": 3}, 3),
        (8, {"workers": 3, "without": frozenset({"multiqueue"})}, 1),
    ],
)
def test_udp_workers_from_the_cpus_the_flag_and_multiqueue(cpus, flags, expected):
    assert udp_settings(cpus=cpus, **flags).workers == expected


def test_a_feature_turned_off_or_refused_is_settled_with_its_line():
    s = udp_settings(without=frozenset({"drain", "uso"}), refuse=frozenset({"c-loop", "fast-csum"}))
    assert not s.drain and not s.uso and s.fast_csum and not s.simd and s.refuse == {"c-loop", "fast-csum"}
    assert not s.c_loop and s.warnings == (
        "c-loop refused (--refuse c-loop): Python wakes the fast path per wake-up",
    )
    assert (
        not udp_settings(without=frozenset({"c-loop"})).c_loop
        and udp_settings(without=frozenset({"c-loop"})).warnings == ()
    )


def test_udp_settings_carry_the_port_warning():
    s = udp_settings(options={"Port": 9000}, port=9100, sources={"port": "--port"})
    assert s.port == 9100 and s.warnings == (f"--port 9100 overrides Backend.Port 9000; {ONE_PORT}",)


# --- how a burst fits the udp route table -----------------------------------------------------------


def peer_lease(third: int, host: int = 12) -> Lease:
    return Lease(IPv4Network(f"10.100.{third}.0/24"), IPv4Address(f"192.0.2.{host}"))


def test_a_burst_fits_the_table_removals_first_and_repoints_cost_nothing():
    table = {peer_lease(1).subnet: peer_lease(1).public_ip, peer_lease(2).subnet: peer_lease(2).public_ip}
    removed = [peer_lease(1), peer_lease(9)]  # 9 is not in the table: nothing to remove
    added = [peer_lease(2, host=13), peer_lease(3), peer_lease(4), peer_lease(3, host=14)]
    gone, fresh, failures = fit_routes(table, removed, added, max_routes=2)
    assert gone == {peer_lease(1).subnet}
    # 2 is repointed in place, 3 takes the room 1 left, 3 again is a repoint within the burst
    assert fresh == {
        peer_lease(2).subnet: IPv4Address("192.0.2.13"),
        peer_lease(3).subnet: IPv4Address("192.0.2.14"),
    }
    assert [(lease.subnet, str(e)) for lease, e in failures] == [
        (peer_lease(4).subnet, "route table full (2 routes)")
    ]


def test_a_refused_udp_gso_is_said_once_as_the_send_direction_whichever_call_met_it(caplog):
    config = NetworkConfig.parse({"Network": "10.100.0.0/16"})
    backend = create_backend(BackendContext(config, UNDERLAY, UNDERLAY.address))
    refused = UdpGsoDisabled(errno.EIO, 3)
    with caplog.at_level(logging.WARNING, logger="tunproxy"):
        backend._worker_error("udp->tun", refused)  # the drain's send, inside udp_to_tun
        backend._worker_error("tun->udp", refused)  # a second worker finding out for itself
    assert [r.getMessage() for r in caplog.records] == [
        f"tun->udp (tunproxy0 -> UDP {UNDERLAY.address}:8285): UDP GSO disabled, "
        "sending datagrams one by one: Input/output error"
    ]
