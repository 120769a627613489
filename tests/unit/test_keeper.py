"""The lease keeper with a fake clock and an in-memory etcd: renewal timing, loss, backoff, revokes.

No root, no etcd, no sleeps: time moves only when the test moves it.
"""

from __future__ import annotations

import asyncio
import math
from ipaddress import IPv4Address, IPv4Network

import pytest

from tests.etcd.fake import FakeClock, FakeEtcd, FakeHost
from tests.etcd.scenario import FakeWorld, deleted_key_scenario
from tunproxy.etcd.keeper import (
    REVOKE_RETRY,
    Held,
    Keeper,
    Reacquire,
    Renew,
    Report,
    RevokeUnused,
    State,
    Stored,
    Verify,
    Wait,
)
from tunproxy.model import Lease, NetworkConfig

CONFIG = NetworkConfig.parse({"Network": "10.100.0.0/16"})
ME = IPv4Address("192.0.2.1")
OTHER = IPv4Address("192.0.2.9")
SUBNET = IPv4Network("10.100.5.0/24")
LEASE = Lease(SUBNET, ME, "udp")
T0 = 1000.0


def host(ttl: float = 30, margin: float = 10) -> FakeHost:
    return FakeHost(FakeEtcd(FakeClock(T0)), CONFIG, ME, ttl, margin)


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 3) for a, b in zip(times, times[1:], strict=False)]


def renewals(h: FakeHost) -> list[float]:
    return [at for at, what in h.etcd.calls if what == "refresh"]


@pytest.mark.parametrize(
    ("ttl", "margin", "period"),
    [
        (30, 10, 20),  # renewed margin seconds before expiry
        (24 * 3600, 3600, 23 * 3600),  # flannel's defaults
        (10, 20, 5),  # a margin not below the TTL: halfway
        (10, 0, 5),  # no margin at all: halfway too
        (3, 2, 1),
    ],
)
def test_the_lease_is_renewed_margin_seconds_before_it_expires(ttl, margin, period):
    h = host(ttl, margin)
    h.start()
    h.run_for(3 * period + period / 2)
    assert renewals(h) == [T0 + period, T0 + 2 * period, T0 + 3 * period]
    assert h.keeper.expires_at == T0 + 3 * period + ttl
    assert h.keeper.remaining(h.clock.now) == pytest.approx(ttl - period / 2)
    assert h.reports == []


def test_nothing_is_due_before_renewal_time():
    k = Keeper(30, 10)
    k.acquired(T0, Held(LEASE, 7, 30))
    assert k.poll(T0) == Wait(T0 + 20)
    assert k.poll(T0 + 19.9) == Wait(T0 + 20)
    assert k.poll(T0 + 20) == Renew(7)
    assert k.state is State.RENEWING


def test_a_lease_granted_shorter_than_asked_is_renewed_within_it():
    k = Keeper(30, 10)
    k.acquired(T0, Held(LEASE, 7, 8))  # etcd granted 8 s, below the margin
    assert k.poll(T0) == Wait(T0 + 4)


def test_expiry_is_reported_and_a_lease_not_renewed_expires():
    h = host(30, 10)
    h.start()
    assert h.keeper.remaining(T0) == 30
    h.etcd.fail_next = 100  # etcd unreachable: every renewal fails
    h.run_for(31)
    assert h.keeper.remaining(h.clock.now) < 0
    h.etcd.fail_next = 0
    h.run_for(10)  # the next renewal hears the lease is gone, and a new one is taken
    assert h.reports and h.reports[-1].subnet == h.keeper.lease.subnet
    assert h.keeper.remaining(h.clock.now) > 0


def test_a_renewal_that_finds_the_lease_gone_reacquires_the_same_subnet():
    k = Keeper(30, 10)
    k.acquired(T0, Held(LEASE, 7, 30))
    assert k.poll(T0 + 20) == Renew(7)
    k.renewed(T0 + 20, -1)
    assert k.state is State.LOST
    assert k.problem == f"our lease on {SUBNET} was lost; re-acquiring a subnet"
    assert [m.text for m in k.messages()] == [
        f"our lease on {SUBNET} expired in etcd; acquiring a subnet again"
    ]
    assert k.poll(T0 + 20) == Reacquire(SUBNET)
    k.reacquired(T0 + 21, Held(LEASE, 8, 30))
    assert k.problem is None
    assert k.poll(T0 + 21) == Report(LEASE)
    assert k.poll(T0 + 21) == RevokeUnused((7,))  # the old etcd lease, in case it lingers
    k.revoked(7)
    assert k.poll(T0 + 21) == Wait(T0 + 41)


def test_a_verify_that_finds_our_key_taken_reacquires():
    k = Keeper(30, 10)
    k.acquired(T0, Held(LEASE, 7, 30))
    assert k.observed(SUBNET, Lease(SUBNET, OTHER)) is True  # the watch saw someone else's value
    assert k.poll(T0 + 1) == Verify(SUBNET)
    k.verified(T0 + 1, Stored(Lease(SUBNET, OTHER), 0))
    assert k.messages()[0].text == f"our subnet {SUBNET} now names {OTHER} in etcd; acquiring another"
    assert k.poll(T0 + 1) == Reacquire(SUBNET)


def test_a_verify_that_finds_our_key_ours_changes_nothing_or_follows_its_etcd_lease():
    k = Keeper(30, 10)
    k.acquired(T0, Held(LEASE, 7, 30))
    assert k.observed(SUBNET, LEASE) is False  # our own put: nothing to check
    assert k.observed(IPv4Network("10.100.6.0/24"), None) is False  # someone else's key
    assert k.observed(SUBNET, None) is True
    assert k.poll(T0 + 1) == Verify(SUBNET)
    k.verified(T0 + 1, Stored(LEASE, 7))
    assert (k.state, k.poll(T0 + 1)) == (State.HOLDING, Wait(T0 + 20))
    k.observed(SUBNET, None)
    k.poll(T0 + 2)
    k.verified(T0 + 2, Stored(LEASE, 9))  # re-put on another etcd lease: follow it, renew it now
    assert k.etcd_lease == 9
    assert k.poll(T0 + 2) == RevokeUnused((7,))
    k.revoked(7)
    assert k.poll(T0 + 2) == Renew(9)


def test_failed_calls_back_off_doubling_to_ten_seconds_and_a_success_resets():
    h = host(3600, 600)  # renewals fall due at 3000 s; the lease outlives the outage
    h.start()
    h.etcd.fail_next = 8
    h.run_for(3000 + 0.5 + 1 + 2 + 4 + 8 + 10 + 10 + 10 + 1)
    tries = renewals(h)
    assert tries[0] == T0 + 3000
    assert gaps(tries) == [0.5, 1, 2, 4, 8, 10, 10, 10]  # the 9th try succeeds
    assert h.keeper.expires_at == tries[-1] + 3600
    h.etcd.fail_next = 2
    h.run_for(3000 + 5)  # the next renewal, 3000 s after that success, fails twice more
    assert gaps(renewals(h)[9:]) == [0.5, 1]  # the backoff started again from 0.5 s
    assert h.reports == []  # never lost


def test_a_failed_verify_is_retried_after_the_backoff():
    k = Keeper(30, 10)
    k.acquired(T0, Held(LEASE, 7, 30))
    k.observed(SUBNET, None)
    assert k.poll(T0 + 1) == Verify(SUBNET)
    k.failed(T0 + 1)
    assert k.poll(T0 + 1.2) == Wait(T0 + 1.5)
    assert k.poll(T0 + 1.5) == Verify(SUBNET)


def test_no_free_subnet_is_retried_backing_off_to_thirty_seconds_and_said_once():
    k = Keeper(30, 10)
    k.acquired(T0, Held(LEASE, 7, 30))
    k.poll(T0 + 20)
    k.renewed(T0 + 20, 0)
    k.messages()
    now, waits = T0 + 20, []
    for _ in range(8):
        assert k.poll(now) == Reacquire(SUBNET)
        k.reacquire_failed(now, "no free subnet in 10.100.0.0/16")
        wait = k.poll(now)
        assert isinstance(wait, Wait)
        waits.append(wait.until - now)
        now = wait.until
    assert waits == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert [m.text for m in k.messages()] == [
        "cannot acquire a subnet again: no free subnet in 10.100.0.0/16; retrying"
    ]


def test_an_unused_lease_is_revoked_again_every_revoke_retry_until_it_succeeds():
    h = host(3600, 600)
    h.start()
    h.keeper.unused(0x77)
    h.etcd.fail_next = 3
    h.run_for(3 * REVOKE_RETRY + 1)
    revokes = [at for at, what in h.etcd.calls if what == "revoke"]
    assert revokes == [T0, T0 + REVOKE_RETRY, T0 + 2 * REVOKE_RETRY, T0 + 3 * REVOKE_RETRY]
    h.run_for(100)
    assert [what for _, what in h.etcd.calls].count("revoke") == 4  # done: no more tries
    assert h.keeper.poll(h.clock.now) == Wait(T0 + 3000)


def test_a_reservation_is_never_renewed_and_never_expires():
    clock = FakeClock(T0)
    etcd = FakeEtcd(clock)
    etcd.put(LEASE, 0)  # an operator's reservation naming us
    h = FakeHost(etcd, CONFIG, ME, 30, 10)
    assert h.start() == LEASE
    assert h.keeper.etcd_lease == 0
    assert h.keeper.poll(T0) == Wait(math.inf)
    h.run_for(10 * 24 * 3600)
    assert renewals(h) == [] and h.reports == []
    assert h.keeper.remaining(h.clock.now) is None


def test_an_answer_out_of_turn_is_refused():
    k = Keeper(30, 10)
    with pytest.raises(RuntimeError, match="awaits|answer for"):
        k.renewed(T0, 30)
    k.acquired(T0, Held(LEASE, 7, 30))
    k.poll(T0 + 20)
    with pytest.raises(RuntimeError, match="awaits the answer to its renewing call"):
        k.poll(T0 + 20)


def test_the_deleted_key_scenario_on_the_fake():
    """The scenario tests/etcd/test_scenario.py also runs against a real etcd."""
    asyncio.run(deleted_key_scenario(FakeWorld()))


def test_an_unused_etcd_lease_is_revoked_only_when_nothing_holds_it():
    from tunproxy.etcd.keeper import RevokeVerdict, revoke_verdict

    assert revoke_verdict(-1, 0) is RevokeVerdict.GONE
    assert revoke_verdict(3000, 1) is RevokeVerdict.HOLDS_KEYS  # a key was attached again: keep it
    assert revoke_verdict(3000, 0) is RevokeVerdict.REVOKE


def test_hosts_that_lost_a_race_spread_out_up_to_a_second():
    import random

    from tunproxy.etcd.acquire import race_delay

    rng = random.Random(7)
    assert all(0 <= race_delay(1, rng) <= 0.04 for _ in range(100))
    assert max(race_delay(20, rng) for _ in range(200)) <= 1.0
    assert max(race_delay(20, rng) for _ in range(200)) > 0.5
