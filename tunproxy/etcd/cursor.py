"""Where the watch on ``<prefix>/subnets/`` stands, and what each response means for it; pure.

How it works. ``WatchCursor`` holds the last revision applied. The first
time, and whenever resuming cannot be trusted, the registry lists the prefix
(a ``Snapshot``) and the cursor takes the listing's revision. A watch
(re)starts at revision+1, so nothing already applied is replayed and nothing
after it is missed. Each response is judged by the cursor:

==================================  ==========  ==============================
response                            step        cursor afterwards
==================================  ==========  ==============================
compact_revision set                COMPACTED   list again (after a backoff)
cancelled, or created=False         FAIL        list again
first header below our revision     RELIST      list again now (store restored)
events                              APPLY       at the last event's revision
no events (progress notification)   APPLY       at the header's revision
==================================  ==========  ==============================

flannel does the same (pkg/subnet/etcd/registry.go: resume at revision+1,
relist on ErrCompacted). A stream that hears nothing for ``WATCH_IDLE``
seconds is asked for progress (WatchProgressRequest, etcd 3.4+); one that
does not answer within the call timeout is restarted from the cursor.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

WATCH_IDLE = 30.0  # seconds of watch silence before asking etcd for progress


class Step(Enum):
    """What to do with the watch after one response (table in the module docstring)."""

    APPLY = "apply"  # hand the events on (if any); the watch goes on
    COMPACTED = "compacted"  # history we need is gone: back off, list again
    FAIL = "fail"  # the watch ended or was refused: restart it (listing again if the cursor says so)
    RELIST = "relist"  # the store is behind us: list again at once


@dataclass(frozen=True)
class Response:
    """What the cursor needs of one etcd WatchResponse."""

    header_revision: int = 0
    created: bool = False
    canceled: bool = False
    cancel_reason: str = ""
    compact_revision: int = 0
    last_event_revision: int = 0  # mod_revision of the last event; 0: none (a progress notification)


@dataclass(frozen=True)
class Verdict:
    """The cursor's judgement of one response: the step, and why for the log."""

    step: Step
    message: str = ""  # why, for the log (empty for APPLY)


@dataclass
class WatchCursor:
    """Where the watch stands: the last revision applied, and whether to list first."""

    revision: int = 0
    need_list: bool = True

    def listed(self, revision: int) -> None:
        """A full listing at ``revision`` was handed out as a snapshot."""
        self.revision = revision
        self.need_list = False

    def start_revision(self) -> int:
        """Where a (re)started watch begins: nothing at or before ``revision`` is replayed."""
        return self.revision + 1

    def seen(self, revision: int) -> None:
        """Events up to ``revision`` (or a progress notification at it) were applied."""
        if revision > self.revision:
            self.revision = revision

    def compacted(self) -> None:
        """History after our revision is gone: only a fresh listing is correct."""
        self.need_list = True

    def store_at(self, current: int) -> bool:
        """The store reports ``current``; below our revision means it was restored or replaced."""
        if current < self.revision:
            self.need_list = True
            return False
        return True

    def first(self, resp: Response | None) -> Verdict:
        """Judge the answer to a watch create request (None: the stream closed first)."""
        if resp is None:
            return Verdict(Step.FAIL, "the watch stream closed before it started")
        if resp.compact_revision:
            return self._compacted(resp.compact_revision)
        if resp.canceled or not resp.created:
            self.compacted()
            return Verdict(Step.FAIL, f"etcd refused the watch: {resp.cancel_reason or 'no reason given'}")
        if not self.store_at(resp.header_revision):
            return Verdict(
                Step.RELIST,
                f"etcd is at revision {resp.header_revision}, behind the {self.revision} we had seen "
                "(restored from a backup?); listing again",
            )
        return Verdict(Step.APPLY)

    def next(self, resp: Response | None) -> Verdict:
        """Judge a later response (None: the stream ended). A progress notification moves the cursor
        here; events move it only once applied (``seen``), so a cancelled hand-over is replayed."""
        if resp is None:
            return Verdict(Step.FAIL, "the watch stream ended")
        if resp.compact_revision:
            return self._compacted(resp.compact_revision)
        if resp.canceled:
            self.compacted()
            return Verdict(Step.FAIL, f"etcd cancelled the watch: {resp.cancel_reason or 'no reason given'}")
        if not resp.last_event_revision:
            self.seen(resp.header_revision)
        return Verdict(Step.APPLY)

    def _compacted(self, compact_revision: int) -> Verdict:
        had = self.revision
        self.compacted()
        return Verdict(
            Step.COMPACTED,
            f"missed history compacted up to revision {compact_revision} (we had {had}); listing again",
        )
