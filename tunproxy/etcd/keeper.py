"""The lease keeper: when to renew our etcd lease, check our key, take a subnet again; pure.

Theory of operation. Our key ``<prefix>/subnets/<subnet>`` is attached to an
etcd lease with a TTL; unless renewed it expires and peers drop our route.
The keeper is a plain object: the registry feeds it the clock (``now``,
monotonic seconds), the replies to the calls it asked for and what the watch
saw of our key, and ``poll(now)`` answers with the next thing to do: a
``Renew``, a ``Verify``, a ``Reacquire``, a ``RevokeUnused``, a ``Report`` of a
new lease for the daemon, or a ``Wait`` until a time (an observation may
end a wait early). It never sleeps, never reads a clock, never calls etcd.

State table (``poll`` in the first column's state, or an input there):

===========  ======================================  ===========  ==============================
state        input                                   next state   action / effect
===========  ======================================  ===========  ==============================
any          acquired(now, held)                     HOLDING      renew_at, expires_at from TTL
HOLDING      poll, our key was seen changed          VERIFYING    Verify(subnet)
HOLDING      poll, now >= renew_at                   RENEWING     Renew(etcd_lease)
HOLDING      poll, otherwise                         HOLDING      Wait(renew_at, or a revoke due)
RENEWING     renewed(now, ttl > 0)                   HOLDING      renew_at = now + renew_delay
RENEWING     renewed(now, ttl <= 0)                  LOST         problem set ("was lost")
VERIFYING    verified(now, ours, same etcd lease)    HOLDING      nothing
VERIFYING    verified(now, ours, other etcd lease)   HOLDING      follow it; old lease unused
VERIFYING    verified(now, absent or not ours)       LOST         problem set
LOST         poll                                    REACQUIRING  Reacquire(previous subnet)
REACQUIRING  reacquired(now, held)                   HOLDING      Report(lease); old lease unused
REACQUIRING  reacquire_failed(now, why)              BACKOFF      retry in 0.5 s doubling to 30 s
awaiting     failed(now)                             BACKOFF      retry in 0.5 s doubling to 10 s
BACKOFF      poll, now >= retry_at                   HOLDING,     (then as there; a failed Verify
                                                     or LOST      is asked again)
BACKOFF      poll, otherwise                         BACKOFF      Wait(retry_at)
===========  ======================================  ===========  ==============================

Awaiting is RENEWING, VERIFYING or REACQUIRING: a call is out, and ``poll`` there is an error.

Beside the states: a ``Report`` pending is returned first; then etcd leases
we stopped using (``unused``) are revoked, all due at once, and after a
failure again every ``REVOKE_RETRY`` seconds until it succeeds (a lease left
behind lives out its TTL, holding nothing). A reservation (a key with no
etcd lease, put there by an operator) has nothing to renew: its renew_at is
infinite. Any successful reply resets the failure backoff. Observations are
ignored while LOST or REACQUIRING: acquisition reads the store afresh.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from enum import Enum
from ipaddress import IPv4Network

from ..logonce import Said
from ..model import ConfigError, Lease
from .retry import Backoff

DEFAULT_TTL = 24 * 3600.0  # flannel's default subnet lease TTL (--subnet-lease-ttl 24h)
DEFAULT_RENEW_MARGIN = 3600.0  # flannel's default --subnet-lease-renew-margin (60 min)
REVOKE_RETRY = 10.0  # seconds between tries at revoking a lease we no longer use


def effective_renew_margin(ttl: float, margin: float) -> tuple[float, str | None]:
    """The renew margin to use for ``ttl``, and a warning if the requested one had to be clamped.

    A margin at or above the TTL would renew before the lease even exists; a
    margin of zero or less would renew after it expired. Either way we renew
    halfway through the lease instead. Raises ConfigError for a TTL <= 0.
    """
    if ttl <= 0:
        raise ConfigError(f"lease TTL {ttl:g}s must be positive")
    if 0 < margin < ttl:
        return margin, None
    half = ttl / 2
    if margin >= ttl:
        why = f"{margin:g}s is not below the lease TTL {ttl:g}s"
    else:
        why = f"{margin:g}s must be positive"
    return half, f"lease renew margin {why}; renewing halfway through the lease ({half:g}s before expiry)"


def renew_delay(granted_ttl: float, margin: float) -> float:
    """Seconds from a (re)grant or keep-alive until the next renewal."""
    if granted_ttl <= 0:
        return 0.0
    if margin < granted_ttl:
        return granted_ttl - margin
    return granted_ttl / 2  # etcd granted less than we asked for: stay safely inside it


# --- inputs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Held:
    """A lease as acquisition wrote it: on ``etcd_lease`` granted ``ttl`` s (0 and None: a reservation)."""

    lease: Lease
    etcd_lease: int = 0
    ttl: float | None = None


@dataclass(frozen=True)
class Stored:
    """Our key as a read found it: its value (None if it does not parse) and its etcd lease (0: none)."""

    lease: Lease | None
    etcd_lease: int


# --- actions -----------------------------------------------------------------------


@dataclass(frozen=True)
class Wait:
    """Nothing to do before ``until`` (monotonic s; math.inf: until an observation)."""

    until: float


@dataclass(frozen=True)
class Renew:
    """Send a keep-alive for ``etcd_lease``; answer with ``renewed(now, ttl)`` or ``failed(now)``."""

    etcd_lease: int


@dataclass(frozen=True)
class Verify:
    """Read our key; answer with ``verified(now, Stored or None)`` or ``failed(now)``."""

    subnet: IPv4Network


@dataclass(frozen=True)
class Reacquire:
    """Acquire a subnet again, preferring ``previous``.

    Answer ``reacquired``, ``reacquire_failed`` (no subnet) or ``failed`` (the call failed).
    """

    previous: IPv4Network


@dataclass(frozen=True)
class RevokeUnused:
    """Revoke these etcd leases (unless keys were re-attached); answer ``revoked(id)`` / ``revoke_failed``."""

    ids: tuple[int, ...]


@dataclass(frozen=True)
class Report:
    """Our lease changed: hand the daemon ``OwnLease(lease)``."""

    lease: Lease


Action = Wait | Renew | Verify | Reacquire | RevokeUnused | Report


@dataclass(frozen=True)
class Say:
    """A line for the log (``level`` from the logging module)."""

    level: int
    text: str


class State(Enum):
    """Where the keeper is in keeping our lease; ``*ING`` states have a call out."""

    IDLE = "idle"  # nothing acquired yet
    HOLDING = "holding"  # waiting for renew time or an observation
    RENEWING = "renewing"  # Renew sent
    VERIFYING = "verifying"  # Verify sent
    LOST = "lost"  # our lease is gone; Reacquire is next
    REACQUIRING = "reacquiring"  # Reacquire sent
    BACKOFF = "backoff"  # a call failed; waiting to retry


_AWAITING = (State.RENEWING, State.VERIFYING, State.REACQUIRING)


class Keeper:
    """Keeps our lease (see the module docstring). ``ttl`` is what we ask etcd for, in whole seconds."""

    def __init__(self, ttl: float = DEFAULT_TTL, renew_margin: float = DEFAULT_RENEW_MARGIN) -> None:
        self.ttl = max(1, math.ceil(ttl))
        self.renew_margin, self.warning = effective_renew_margin(self.ttl, renew_margin)
        self.state = State.IDLE
        self.lease: Lease | None = None
        self.etcd_lease = 0
        self.renew_at = math.inf  # monotonic s
        self.expires_at: float | None = None  # monotonic s; None: a reservation does not expire
        self.problem: str | None = None  # while our lease is lost and being re-acquired
        self.retry_at = math.inf
        self._check = False
        self._after_backoff = State.HOLDING
        self._backoff = Backoff()
        self._reacquire_backoff = Backoff(cap=30.0)
        self._reacquire_said = Said()  # the reason last said for failing to re-acquire
        self._to_revoke: set[int] = set()
        self._revoke_at = -math.inf
        self._reports: list[Lease] = []
        self._said: list[Say] = []

    # --- what the keeper answers ----------------------------------------------------

    def poll(self, now: float) -> Action:
        """The next thing to do at ``now``. Not while a Renew, Verify or Reacquire is unanswered."""
        if self.state in _AWAITING:
            raise RuntimeError(f"the keeper awaits the answer to its {self.state.value} call")
        if self._reports:
            return Report(self._reports.pop(0))
        due = self.revoke_due(now)
        if due is not None:
            return due
        if self.state is State.BACKOFF:
            if now < self.retry_at:
                return Wait(min(self.retry_at, self._revoke_due()))
            self.state = self._after_backoff
        assert self.lease is not None or self.state is State.IDLE
        if self.state is State.LOST:
            assert self.lease is not None
            self.state = State.REACQUIRING
            return Reacquire(self.lease.subnet)
        if self.state is State.HOLDING:
            assert self.lease is not None
            if self._check:
                self._check = False
                self.state = State.VERIFYING
                return Verify(self.lease.subnet)
            if now >= self.renew_at:
                self.state = State.RENEWING
                return Renew(self.etcd_lease)
            return Wait(min(self.renew_at, self._revoke_due()))
        return Wait(self._revoke_due())

    def revoke_due(self, now: float) -> RevokeUnused | None:
        """The leases to revoke if a try is due at ``now`` (then answer ``revoked``/``revoke_failed``)."""
        if not self._to_revoke or now < self._revoke_at:
            return None
        self._revoke_at = math.inf  # until revoked() or revoke_failed() says how it went
        return RevokeUnused(tuple(sorted(self._to_revoke)))

    def messages(self) -> list[Say]:
        """Log lines said since the last call, oldest first."""
        said, self._said = self._said, []
        return said

    def remaining(self, now: float) -> float | None:
        """Seconds until our lease expires unless renewed (may be negative); None for a reservation."""
        return None if self.expires_at is None else self.expires_at - now

    def _revoke_due(self) -> float:
        return self._revoke_at if self._to_revoke else math.inf

    # --- inputs ------------------------------------------------------------------

    def acquired(self, now: float, held: Held) -> None:
        """``held`` was written at ``now`` (for a grant: just before the grant was asked for)."""
        self._hold(now, held)
        self._check = False
        if self._to_revoke:
            self._revoke_at = -math.inf  # a try cut short (a new acquire) is made again

    def renewed(self, now: float, ttl: float) -> None:
        """The keep-alive answered ``ttl`` s left (<= 0: the lease is gone in etcd)."""
        self._expect(State.RENEWING)
        assert self.lease is not None
        self._backoff.reset()
        if ttl <= 0:
            subnet = self.lease.subnet
            self._say(logging.WARNING, f"our lease on {subnet} expired in etcd; acquiring a subnet again")
            self._lose()
            return
        self.renew_at = now + renew_delay(ttl, self.renew_margin)
        self.expires_at = now + ttl
        self.state = State.HOLDING
        self._say(logging.DEBUG, f"renewed our lease on {self.lease.subnet} for {ttl:g}s")

    def verified(self, now: float, stored: Stored | None) -> None:
        """The read of our key found ``stored`` (None: the key is gone)."""
        self._expect(State.VERIFYING)
        assert self.lease is not None
        self._backoff.reset()
        subnet = self.lease.subnet
        self.state = State.HOLDING
        if stored is None:
            gone = f"our lease on {subnet} was deleted from etcd; acquiring a subnet again"
            self._say(logging.WARNING, gone)
            self._lose()
        elif stored.lease is None or stored.lease.public_ip != self.lease.public_ip:
            who = stored.lease.public_ip if stored.lease else "an unreadable value"
            self._say(logging.WARNING, f"our subnet {subnet} now names {who} in etcd; acquiring another")
            self._lose()
        elif stored.etcd_lease != self.etcd_lease:
            # Someone re-put it for us (an operator, or a second copy of us): follow that.
            self._say(logging.INFO, f"our key {subnet} is now on etcd lease {stored.etcd_lease:x}")
            self.unused(self.etcd_lease)
            self.etcd_lease = stored.etcd_lease
            self.renew_at = now if stored.etcd_lease else math.inf

    def reacquired(self, now: float, held: Held) -> None:
        """Acquisition after a loss wrote ``held``; the daemon is told with a ``Report``."""
        self._expect(State.REACQUIRING)
        old = self.etcd_lease
        self._hold(now, held)
        if old != held.etcd_lease:
            self.unused(old)
        self.problem = None
        self._reacquire_said.forget("reacquire")
        self._reacquire_backoff.reset()
        self._reports.append(held.lease)

    def reacquire_failed(self, now: float, reason: str) -> None:
        """Acquisition found no subnet (``reason``, e.g. none free): try again, backing off to 30 s."""
        self._expect(State.REACQUIRING)
        delay = self._reacquire_backoff.next()
        if self._reacquire_said.due("reacquire", reason):
            self._say(logging.ERROR, f"cannot acquire a subnet again: {reason}; retrying")
        self._back_off(now, delay, State.LOST)

    def failed(self, now: float) -> None:
        """The call for the pending Renew, Verify or Reacquire failed: retry it after a backoff."""
        if self.state not in _AWAITING:
            raise RuntimeError(f"no call is pending in state {self.state.value}")
        if self.state is State.VERIFYING:
            self._check = True
        after = State.LOST if self.state is State.REACQUIRING else State.HOLDING
        self._back_off(now, self._backoff.next(), after)

    def observed(self, subnet: IPv4Network, lease: Lease | None) -> bool:
        """The watch saw ``subnet`` put (``lease``; None if gone or unreadable). True: poll now."""
        if self.state in (State.IDLE, State.LOST, State.REACQUIRING) or self.lease is None:
            return False
        if subnet != self.lease.subnet or (lease is not None and lease.public_ip == self.lease.public_ip):
            return False
        self._check = True
        return True

    def observed_listing(self, leases: tuple[Lease, ...]) -> bool:
        """A full listing: is our key missing from it, or someone else's? True: poll now."""
        if self.lease is None:
            return False
        found = next((lease for lease in leases if lease.subnet == self.lease.subnet), None)
        return self.observed(self.lease.subnet, found)

    def unused(self, etcd_lease: int) -> None:
        """We stopped using ``etcd_lease`` (0: none): revoke it soon, or it lives out its TTL."""
        if etcd_lease:
            self._to_revoke.add(etcd_lease)
            self._revoke_at = -math.inf

    def revoked(self, etcd_lease: int) -> None:
        """``etcd_lease`` is dealt with (revoked, already gone, or in use again by someone)."""
        self._to_revoke.discard(etcd_lease)
        if self._revoke_at == math.inf:
            self._revoke_at = -math.inf

    def revoke_failed(self, now: float) -> None:
        """A revoke failed: those left are tried again ``REVOKE_RETRY`` s from ``now``."""
        self._revoke_at = now + REVOKE_RETRY

    # --- inside ---------------------------------------------------------------------

    def _hold(self, now: float, held: Held) -> None:
        self.lease = held.lease
        self.etcd_lease = held.etcd_lease
        if held.etcd_lease and held.ttl is not None:
            self.renew_at = now + renew_delay(held.ttl, self.renew_margin)
            self.expires_at = now + held.ttl
        else:
            self.renew_at = math.inf
            self.expires_at = None
        self.state = State.HOLDING

    def _lose(self) -> None:
        assert self.lease is not None
        self.problem = f"our lease on {self.lease.subnet} was lost; re-acquiring a subnet"
        self.state = State.LOST

    def _back_off(self, now: float, delay: float, after: State) -> None:
        self.retry_at = now + delay
        self._after_backoff = after
        self.state = State.BACKOFF

    def _expect(self, state: State) -> None:
        if self.state is not state:
            raise RuntimeError(f"an answer for {state.value}, but the keeper is {self.state.value}")

    def _say(self, level: int, text: str) -> None:
        self._said.append(Say(level, text))


class RevokeVerdict(Enum):
    """What to do with an etcd lease we stopped using."""

    GONE = "gone"  # etcd no longer knows it (TTL -1): nothing to do
    HOLDS_KEYS = "holds keys"  # someone attached a key to it again: revoking would delete that key
    REVOKE = "revoke"


def revoke_verdict(ttl: int, keys: int) -> RevokeVerdict:
    """The rule for an unused etcd lease, from etcd's LeaseTimeToLive answer (``ttl`` in seconds,
    -1 if the lease is gone; ``keys`` attached to it)."""
    if ttl == -1:
        return RevokeVerdict.GONE
    return RevokeVerdict.HOLDS_KEYS if keys else RevokeVerdict.REVOKE
