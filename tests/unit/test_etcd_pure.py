"""The etcd registry's pure decisions, without etcd: acquisition, renewal timing, backoff, watch cursor."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunproxy.etcd.acquire import Entry, PlanKind, choose_subnet, plan_acquisition
from tunproxy.etcd.cursor import Step, Verdict, WatchCursor
from tunproxy.etcd.endpoints import Endpoint, parse_endpoints
from tunproxy.etcd.keeper import effective_renew_margin, renew_delay
from tunproxy.etcd.retry import Backoff
from tunproxy.etcd.table import format_duration, format_leases
from tunproxy.etcd.values import LeaseDecoder, entry_from
from tunproxy.model import ConfigError, Lease, NetworkConfig

NET = NetworkConfig.parse({"Network": "10.100.0.0/16"})
SMALL = NetworkConfig.parse(
    {"Network": "10.100.0.0/16", "SubnetMin": "10.100.1.0", "SubnetMax": "10.100.4.0"}
)
ME = IPv4Address("192.0.2.1")
OTHER = IPv4Address("192.0.2.2")


def net(text: str) -> IPv4Network:
    return IPv4Network(text)


def entry(
    subnet: str, public_ip: IPv4Address | None, etcd_lease: int = 7, rev: int = 3, backend: str = "udp"
) -> Entry:
    lease = Lease(net(subnet), public_ip, backend) if public_ip else None
    return Entry(net(subnet), lease, etcd_lease, rev)


def want(backend: str = "udp", data: object = None) -> Lease:
    return Lease(NET.network, ME, backend, data)


# --- backoff, throttle, renewal -----------------------------------------------------


def test_backoff_doubles_to_the_cap_and_resets():
    b = Backoff(0.5, 10)
    assert [b.next() for _ in range(7)] == [0.5, 1, 2, 4, 8, 10, 10]
    b.reset()
    assert b.next() == 0.5
    with pytest.raises(ValueError):
        Backoff(0, 1)


def test_renew_margin_is_kept_when_sane_and_clamped_otherwise():
    assert effective_renew_margin(86400, 3600) == (3600, None)
    margin, warning = effective_renew_margin(10, 20)
    assert margin == 5 and warning and "20s is not below the lease TTL 10s" in warning
    margin, warning = effective_renew_margin(10, 10)
    assert margin == 5 and warning
    margin, warning = effective_renew_margin(10, 0)
    assert margin == 5 and warning and "must be positive" in warning
    with pytest.raises(ConfigError):
        effective_renew_margin(0, 1)


def test_renew_delay():
    assert renew_delay(86400, 3600) == 82800
    assert renew_delay(2, 1) == 1
    assert renew_delay(4, 5) == 2  # etcd granted less than the margin: renew halfway
    assert renew_delay(0, 1) == 0


# --- acquisition ------------------------------------------------------------------


def test_our_existing_lease_is_renewed_in_place():
    entries = [entry("10.100.7.0/24", OTHER), entry("10.100.9.0/24", ME, rev=11)]
    plan = plan_acquisition(NET, entries, want(), net("10.100.3.0/24"), random.Random(1))
    assert (plan.kind, plan.subnet, plan.mod_revision) == (PlanKind.RENEW, net("10.100.9.0/24"), 11)


def test_a_reservation_naming_us_wins_and_is_rewritten_only_if_different():
    entries = [entry("10.100.9.0/24", ME), entry("10.100.20.0/24", ME, etcd_lease=0, rev=5)]
    plan = plan_acquisition(NET, entries, want(), None, random.Random(1))
    assert (plan.kind, plan.subnet, plan.mod_revision, plan.write) == (
        PlanKind.RESERVED,
        net("10.100.20.0/24"),
        5,
        False,
    )
    plan = plan_acquisition(NET, entries, want("vxlan", {"VtepMAC": "x"}), None, random.Random(1))
    assert plan.kind is PlanKind.RESERVED and plan.write


def test_our_leases_that_no_longer_fit_are_deleted_but_reservations_are_kept():
    entries = [
        entry("10.100.200.0/24", ME),  # beyond SubnetMax now
        entry("10.100.201.0/24", ME, etcd_lease=0),  # a reservation beyond it: left alone
        entry("10.100.1.0/24", OTHER),
    ]
    plan = plan_acquisition(SMALL, entries, want(), None, random.Random(1))
    assert plan.kind is PlanKind.CREATE
    assert plan.subnet in {net("10.100.2.0/24"), net("10.100.3.0/24"), net("10.100.4.0/24")}
    assert [e.subnet for e in plan.stale] == [net("10.100.200.0/24")]


def test_the_previous_subnet_is_used_if_free_and_fitting():
    rng = random.Random(1)
    assert plan_acquisition(NET, [], want(), net("10.100.42.0/24"), rng).subnet == net("10.100.42.0/24")
    taken = [entry("10.100.42.0/24", OTHER)]
    assert plan_acquisition(NET, taken, want(), net("10.100.42.0/24"), rng).subnet != net("10.100.42.0/24")
    # Not in the range (SubnetMax) or of another size: ignored.
    assert choose_subnet(SMALL, [], net("10.100.9.0/24"), rng) != net("10.100.9.0/24")
    assert choose_subnet(NET, [], net("10.100.42.0/25"), rng).prefixlen == 24


def test_unreadable_and_reserved_keys_are_taken():
    entries = [
        entry("10.100.1.0/24", None),
        entry("10.100.2.0/24", OTHER, etcd_lease=0),
        entry("10.100.3.0/24", OTHER),
    ]
    for seed in range(20):
        plan = plan_acquisition(SMALL, entries, want(), None, random.Random(seed))
        assert plan.subnet == net("10.100.4.0/24")


def test_no_free_subnet_names_the_range():
    taken = [net(f"10.100.{i}.0/24") for i in range(1, 5)]
    with pytest.raises(ConfigError) as e:
        choose_subnet(SMALL, taken, None, random.Random(1))
    assert str(e.value) == (
        "no free subnet in 10.100.0.0/16: all 4 /24 subnets from SubnetMin 10.100.1.0 "
        "to SubnetMax 10.100.4.0 are leased or reserved"
    )


def test_a_wider_old_lease_blocks_every_subnet_it_covers():
    taken = [net("10.100.0.0/22")]  # 10.100.1-3.0/24
    for seed in range(20):
        assert choose_subnet(SMALL, taken, net("10.100.2.0/24"), random.Random(seed)) == net("10.100.4.0/24")


@settings(max_examples=200, deadline=None)
@given(
    taken=st.lists(st.tuples(st.integers(0, 31), st.sampled_from([22, 23, 24, 25, 26])), max_size=40),
    previous=st.one_of(st.none(), st.integers(0, 31)),
    seed=st.integers(0, 1000),
)
def test_choose_subnet_against_brute_force(taken, previous, seed):
    config = NetworkConfig.parse({"Network": "10.100.0.0/19", "SubnetLen": 24})  # .1 to .30
    held = [IPv4Network((int(IPv4Address("10.100.0.0")) + (i << 8), plen), strict=False) for i, plen in taken]
    prev = IPv4Network(f"10.100.{previous}.0/24") if previous is not None else None
    free = [c for c in config.candidate_subnets() if not any(c.overlaps(h) for h in held)]
    if not free:
        with pytest.raises(ConfigError):
            choose_subnet(config, held, prev, random.Random(seed))
        return
    got = choose_subnet(config, held, prev, random.Random(seed))
    assert got in free
    if prev in free:
        assert got == prev


def test_entry_from_a_key_and_value():
    e = entry_from("/p/subnets/10.100.5.0-24", b'{"PublicIP": "192.0.2.1"}', 9, 4)
    assert e == Entry(net("10.100.5.0/24"), Lease(net("10.100.5.0/24"), ME, "udp"), 9, 4)
    assert entry_from("/p/subnets/10.100.5.0-24", b"{junk", 0, 4).lease is None
    assert entry_from("/p/subnets/junk", b'{"PublicIP": "192.0.2.1"}', 0, 4) is None


# --- watching ---------------------------------------------------------------------------


def test_watch_cursor_resumes_after_what_it_saw_and_relists_when_told():
    c = WatchCursor()
    assert c.need_list
    c.listed(10)
    assert (c.need_list, c.start_revision()) == (False, 11)
    c.seen(14)
    c.seen(12)  # never backwards
    assert c.start_revision() == 15
    assert c.store_at(14) and not c.need_list
    c.compacted()
    assert c.need_list
    c.listed(20)
    assert not c.store_at(3) and c.need_list  # the store went back: list again


def test_lease_decoder_reports_each_bad_value_once():
    d = LeaseDecoder()
    lease, msg = d.decode("/p/subnets/10.100.5.0-24", b'{"PublicIP": "192.0.2.1"}')
    assert lease == Lease(net("10.100.5.0/24"), ME, "udp") and msg is None
    assert d.decode("/p/subnets/10.100.6.0-24", b"{junk")[1]
    assert d.decode("/p/subnets/10.100.6.0-24", b"{junk") == (None, None)
    assert d.decode("/p/subnets/10.100.6.0-24", b"{other junk")[1]  # a different bad value: say it
    assert d.decode("/p/subnets/nonsense", b"x")[1]
    assert d.decode("/p/subnets/nonsense", b"y") == (None, None)  # a bad key is bad whatever the value
    outside = d.decode("/p/subnets/10.200.6.0-24", b'{"PublicIP": "192.0.2.1"}', NET.network)
    assert outside[0] is None and "outside the network 10.100.0.0/16" in str(outside[1])
    d.forget("/p/subnets/10.100.6.0-24")
    assert d.decode("/p/subnets/10.100.6.0-24", b"{junk")[1]


# --- endpoints and output --------------------------------------------------------------


def test_parse_endpoints():
    assert parse_endpoints("http://192.0.2.100:2379, https://etcd.example:4001") == (
        Endpoint("http", "192.0.2.100", 2379),
        Endpoint("https", "etcd.example", 4001),
    )
    assert parse_endpoints("192.0.2.100:2379") == (Endpoint("http", "192.0.2.100", 2379),)
    assert parse_endpoints("192.0.2.100", tls=True) == (Endpoint("https", "192.0.2.100", 2379),)
    assert parse_endpoints("http://[::1]:2379")[0].target == "[::1]:2379"
    for bad in ("", "ftp://x:1", "http://x:99999", "http://x:2379/v2/keys", "http://"):
        with pytest.raises(ConfigError):
            parse_endpoints(bad)


def test_format_duration():
    assert [format_duration(s) for s in (0, 7, 61, 3599, 3600, 86399)] == [
        "0s",
        "7s",
        "1m01s",
        "59m59s",
        "1h00m",
        "23h59m",
    ]


def test_format_leases_table():
    rows = [
        {
            "subnet": "10.100.5.0/24",
            "public_ip": "192.0.2.1",
            "backend_type": "udp",
            "backend_data": None,
            "ttl_left": 86000,
        },
        {
            "subnet": "10.100.17.0/24",
            "public_ip": "198.51.100.200",
            "backend_type": "vxlan",
            "backend_data": {"VtepMAC": "x"},
            "ttl_left": None,
        },
    ]
    assert format_leases(rows).splitlines() == [
        "SUBNET          PUBLIC-IP       BACKEND  EXPIRES-IN",
        "10.100.5.0/24   192.0.2.1       udp      23h53m",
        "10.100.17.0/24  198.51.100.200  vxlan    never (reserved)",
    ]
    assert format_leases([]) == "SUBNET  PUBLIC-IP  BACKEND  EXPIRES-IN"


def test_config_drift_says_what_is_not_applied():
    from tunproxy.etcd.acquire import config_drift
    from tunproxy.model import NetworkConfig

    running = NetworkConfig.parse({"Network": "10.100.0.0/16"})
    assert config_drift(running, running.to_json().encode()) is None
    assert config_drift(running, b'{"Network": "10.100.0.0/16", "Backend": {"Type": "udp"}}') is None
    assert "from udp to host-gw" in config_drift(
        running, b'{"Network": "10.100.0.0/16", "Backend": {"Type": "host-gw"}}'
    )
    assert "not applied" in config_drift(running, b'{"Network": "10.200.0.0/16"}')
    assert "unusable" in config_drift(running, b"{")
    assert "deleted" in config_drift(running, None)


def test_watch_responses_are_judged_by_the_cursor():
    from tunproxy.etcd.cursor import Response

    cursor = WatchCursor()
    cursor.listed(100)
    assert cursor.first(Response(header_revision=100, created=True)).step is Step.APPLY
    assert cursor.next(Response(header_revision=120)).step is Step.APPLY  # a progress notification
    assert (cursor.revision, cursor.start_revision()) == (120, 121)
    events = cursor.next(Response(header_revision=130, last_event_revision=125))
    assert events.step is Step.APPLY and cursor.revision == 120  # moved only once applied
    compacted = cursor.next(Response(compact_revision=150))
    assert compacted.step is Step.COMPACTED and cursor.need_list
    assert "compacted up to revision 150 (we had 120)" in compacted.message

    cursor.listed(200)
    behind = cursor.first(Response(header_revision=50, created=True))
    assert behind.step is Step.RELIST and cursor.need_list
    assert "at revision 50, behind the 200 we had seen" in behind.message

    cursor.listed(200)
    refused = cursor.first(Response(header_revision=200, canceled=True, cancel_reason="no leader"))
    assert (refused.step, refused.message) == (Step.FAIL, "etcd refused the watch: no leader")
    assert cursor.need_list
    cursor.listed(200)
    assert cursor.first(None) == Verdict(Step.FAIL, "the watch stream closed before it started")
    assert not cursor.need_list  # resumed from the cursor, not relisted
    assert cursor.next(None).message == "the watch stream ended" and not cursor.need_list
    assert cursor.next(Response(canceled=True)).step is Step.FAIL and cursor.need_list


PURE = ("acquire", "cursor", "endpoints", "keeper", "retry", "table", "values")


@pytest.mark.parametrize("name", PURE)
def test_the_pure_etcd_modules_import_only_the_model_layer_and_the_standard_library(name):
    import ast
    import sys
    from pathlib import Path

    import tunproxy.etcd

    path = Path(tunproxy.etcd.__file__).parent / f"{name}.py"
    allowed = {f".{m}" for m in PURE} | {"..model", "..backend_config", "..logonce"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            where = "." * node.level + (node.module or "")
            assert where in allowed or (node.level == 0 and where.split(".")[0] in sys.stdlib_module_names), (
                where
            )
        elif isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name.split(".")[0] in sys.stdlib_module_names, alias.name
    assert "asyncio" not in path.read_text() and "time.time" not in path.read_text()
