from ipaddress import IPv4Address, IPv4Network

from hypothesis import given
from hypothesis import strategies as st

from tunproxy.leases import EventKind, LeaseEvent, LeaseWatcher
from tunproxy.subnets import Lease

OWN = IPv4Network("10.100.5.0/24")


def lease(third: int, host: int = 12) -> Lease:
    return Lease(IPv4Network(f"10.100.{third}.0/24"), IPv4Address(f"192.0.2.{host}"))


def kinds(events):
    return [(e.kind.value, str(e.lease.subnet), str(e.lease.public_ip)) for e in events]


def test_reset_reports_only_differences_and_skips_our_own():
    w = LeaseWatcher(OWN)
    assert kinds(w.reset([lease(1), lease(5), lease(2)])) == [
        ("added", "10.100.1.0/24", "192.0.2.12"),
        ("added", "10.100.2.0/24", "192.0.2.12"),
    ]
    assert w.reset([lease(1), lease(2)]) == []
    assert kinds(w.reset([lease(1), lease(2, host=13), lease(3)])) == [
        ("removed", "10.100.2.0/24", "192.0.2.12"),
        ("added", "10.100.2.0/24", "192.0.2.13"),
        ("added", "10.100.3.0/24", "192.0.2.12"),
    ]


def test_update_dedupes_and_replaces():
    w = LeaseWatcher(OWN)
    assert len(w.update([LeaseEvent.added(lease(1))])) == 1
    assert w.update([LeaseEvent.added(lease(1))]) == []
    assert kinds(w.update([LeaseEvent.added(lease(1, host=14))])) == [
        ("removed", "10.100.1.0/24", "192.0.2.12"),
        ("added", "10.100.1.0/24", "192.0.2.14"),
    ]
    # A delete from a watch only knows the key: the watcher finds the lease by subnet.
    gone = Lease(IPv4Network("10.100.1.0/24"), IPv4Address(0))
    assert kinds(w.update([LeaseEvent.removed(gone)])) == [("removed", "10.100.1.0/24", "192.0.2.14")]
    assert w.update([LeaseEvent.removed(gone)]) == []
    assert w.update([LeaseEvent.added(Lease(OWN, IPv4Address("192.0.2.11")))]) == []


def test_own_subnet_change_drops_a_peer_that_had_it():
    w = LeaseWatcher(OWN)
    w.reset([lease(7)])
    assert kinds(w.set_own_subnet(IPv4Network("10.100.7.0/24"))) == [
        ("removed", "10.100.7.0/24", "192.0.2.12")
    ]
    assert w.leases == {}


leases_st = st.lists(st.tuples(st.integers(0, 6), st.integers(10, 12)), max_size=8).map(
    lambda pairs: list({third: lease(third, host) for third, host in pairs}.values())
)


@given(st.lists(leases_st, min_size=1, max_size=6))
def test_events_replayed_on_an_empty_table_give_the_last_snapshot(snapshots):
    """Whatever sequence of snapshots arrives, the events alone rebuild the final table."""
    w = LeaseWatcher(OWN)
    mirror: dict = {}
    for snap in snapshots:
        for event in w.reset(snap):
            if event.kind is EventKind.ADDED:
                assert event.lease.subnet not in mirror
                mirror[event.lease.subnet] = event.lease
            else:
                assert mirror.pop(event.lease.subnet) == event.lease
    assert mirror == {l.subnet: l for l in snapshots[-1] if l.subnet != OWN}  # noqa: E741


def test_leases_naming_our_public_ip_are_never_routed():
    w = LeaseWatcher(OWN, own_public_ip=IPv4Address("192.0.2.11"))
    assert w.reset([lease(1, host=11), lease(2)]) == [LeaseEvent.added(lease(2))]
    assert w.update([LeaseEvent.added(lease(3, host=11))]) == []
    # Our new lease shows up in the watch where a peer's used to be: drop the peer's route.
    assert kinds(w.update([LeaseEvent.added(lease(2, host=11))])) == [
        ("removed", "10.100.2.0/24", "192.0.2.12")
    ]
