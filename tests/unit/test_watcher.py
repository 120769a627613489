"""The lease fold: snapshots and watch events in, the net route changes out."""

from ipaddress import IPv4Address, IPv4Network

from hypothesis import given
from hypothesis import strategies as st

from tunproxy.model import Lease, LeaseAdded, LeaseRemoved
from tunproxy.watcher import LeaseWatcher, PeerChanges, Waiting

OWN = IPv4Network("10.100.5.0/24")


def lease(third: int, host: int = 12, backend: str = "udp") -> Lease:
    return Lease(IPv4Network(f"10.100.{third}.0/24"), IPv4Address(f"192.0.2.{host}"), backend)


def net(third: int) -> IPv4Network:
    return IPv4Network(f"10.100.{third}.0/24")


def rows(changes: PeerChanges):
    return [("removed", str(x.subnet), str(x.public_ip)) for x in changes.removed] + [
        ("added", str(x.subnet), str(x.public_ip)) for x in changes.added
    ]


def watcher(**kw) -> LeaseWatcher:
    return LeaseWatcher("udp", own_subnet=OWN, **kw)


def test_reset_reports_only_differences_and_skips_our_own():
    w = watcher()
    assert rows(w.reset([lease(1), lease(5), lease(2)])) == [
        ("added", "10.100.1.0/24", "192.0.2.12"),
        ("added", "10.100.2.0/24", "192.0.2.12"),
    ]
    assert not w.reset([lease(1), lease(2)])
    assert sorted(rows(w.reset([lease(1), lease(2, host=13), lease(3)]))) == [
        ("added", "10.100.2.0/24", "192.0.2.13"),
        ("added", "10.100.3.0/24", "192.0.2.12"),
        ("removed", "10.100.2.0/24", "192.0.2.12"),
    ]


def test_update_dedupes_and_replaces():
    w = watcher()
    assert len(w.update([LeaseAdded(lease(1))]).added) == 1
    assert not w.update([LeaseAdded(lease(1))])
    assert rows(w.update([LeaseAdded(lease(1, host=14))])) == [
        ("removed", "10.100.1.0/24", "192.0.2.12"),
        ("added", "10.100.1.0/24", "192.0.2.14"),
    ]
    # A delete from a watch only knows the key: the watcher finds the lease by subnet.
    assert rows(w.update([LeaseRemoved(net(1))])) == [("removed", "10.100.1.0/24", "192.0.2.14")]
    assert not w.update([LeaseRemoved(net(1))])
    assert not w.update([LeaseAdded(Lease(OWN, IPv4Address("192.0.2.11")))])


def test_a_burst_comes_out_as_its_net_change():
    w = watcher()
    w.reset([lease(1)])
    burst = [LeaseAdded(lease(2)), LeaseRemoved(net(2)), LeaseRemoved(net(1)), LeaseAdded(lease(1))]
    assert not w.update(burst)  # 2 came and went, 1 went and came back unchanged
    assert rows(w.update([LeaseAdded(lease(3, host=20)), LeaseAdded(lease(3, host=21))])) == [
        ("added", "10.100.3.0/24", "192.0.2.21")
    ]


def test_own_subnet_change_drops_a_peer_that_had_it():
    w = watcher()
    w.reset([lease(7)])
    assert rows(w.set_own_subnet(net(7))) == [("removed", "10.100.7.0/24", "192.0.2.12")]
    assert w.leases == {}


def test_leases_of_another_backend_are_held_apart_and_reported_once():
    w = watcher()
    changes = w.reset([lease(1), lease(2, backend="vxlan")])
    assert rows(changes) == [("added", "10.100.1.0/24", "192.0.2.12")]
    assert changes.foreign == (lease(2, backend="vxlan"),)
    assert not w.reset([lease(1), lease(2, backend="vxlan")])  # said once
    # A peer that switches backend: its route goes, and it is foreign from now on.
    switched = w.update([LeaseAdded(lease(1, backend="host-gw"))])
    assert rows(switched) == [("removed", "10.100.1.0/24", "192.0.2.12")]
    assert switched.foreign == (lease(1, backend="host-gw"),)
    # ... and back: routed again; a foreign lease that goes is forgotten, so it is said again.
    assert rows(w.update([LeaseAdded(lease(1))])) == [("added", "10.100.1.0/24", "192.0.2.12")]
    assert not w.update([LeaseRemoved(net(2))])
    assert w.update([LeaseAdded(lease(2, backend="vxlan"))]).foreign == (lease(2, backend="vxlan"),)
    assert set(w.leases) == {net(1)} and set(w.foreign) == {net(2)}


leases_st = st.lists(
    st.tuples(st.integers(0, 6), st.integers(10, 12), st.sampled_from(["udp", "udp", "vxlan"])), max_size=8
).map(lambda rows: list({third: lease(third, host, kind) for third, host, kind in rows}.values()))


@given(st.lists(leases_st, min_size=1, max_size=6))
def test_changes_replayed_on_an_empty_table_give_the_last_snapshot(snapshots):
    """Whatever sequence of snapshots arrives, the changes alone rebuild the routed table."""
    w = watcher()
    mirror: dict = {}
    for snap in snapshots:
        changes = w.reset(snap)
        for gone in changes.removed:
            assert mirror.pop(gone.subnet) == gone
        for new in changes.added:
            assert new.subnet not in mirror
            mirror[new.subnet] = new
    assert mirror == {x.subnet: x for x in snapshots[-1] if x.subnet != OWN and x.backend_type == "udp"}


@given(st.lists(st.tuples(st.integers(0, 6), st.integers(10, 12), st.booleans()), max_size=20))
def test_events_fold_to_the_same_table_as_a_snapshot(events):
    """Watch events and a snapshot of where they lead agree: the watch cannot drift."""
    w = watcher()
    table: dict = {}
    for third, host, put in events:
        if put:
            table[net(third)] = lease(third, host)
            w.update([LeaseAdded(lease(third, host))])
        else:
            table.pop(net(third), None)
            w.update([LeaseRemoved(net(third))])
    assert not w.reset(table.values())


def test_leases_naming_our_public_ip_are_never_routed():
    w = watcher(own_public_ip=IPv4Address("192.0.2.11"))
    assert w.reset([lease(1, host=11), lease(2)]) == PeerChanges(added=(lease(2),))
    assert not w.update([LeaseAdded(lease(3, host=11))])
    # Our new lease shows up in the watch where a peer's used to be: drop the peer's route.
    assert rows(w.update([LeaseAdded(lease(2, host=11))])) == [("removed", "10.100.2.0/24", "192.0.2.12")]


def test_waiting_leases_are_offered_again_and_a_reason_said_once():
    waiting = Waiting()
    assert waiting.refused(lease(1), "route table full (1 routes)")
    assert not waiting.refused(lease(1), "route table full (1 routes)")  # the same reason: no new line
    assert waiting.refused(lease(1), "its lease has no VtepMAC")  # a new reason is news
    assert net(1) in waiting and waiting.reason(net(1)) == "its lease has no VtepMAC"
    assert waiting.take() == [lease(1)] and len(waiting) == 0
    assert not waiting.refused(lease(1), "its lease has no VtepMAC")  # taken, refused again: still said


def test_a_waiting_lease_that_goes_needs_no_removal_from_the_backend():
    waiting = Waiting()
    waiting.refused(lease(1), "unreachable")
    routed = lease(2)
    removed = waiting.settle(PeerChanges(removed=(lease(1), routed)))
    assert removed == [routed] and len(waiting) == 0
    assert waiting.refused(lease(1), "unreachable")  # it went and came back: said again
    waiting.settle(PeerChanges(added=(lease(1, host=13),)))  # replaced: the new lease is tried afresh
    assert net(1) not in waiting
