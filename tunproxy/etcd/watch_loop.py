"""The watch on ``<prefix>/subnets/``: list, then follow, resuming after failures; asyncio and gRPC.

The decisions are ``cursor.WatchCursor``'s (where to resume, when to list
again); this module reads and writes the stream. aetcd's own watcher hides
the watch responses (their revisions, progress notifications and
cancellations), so the stream is driven directly through aetcd's gRPC stubs.
What the watch sees of our own key goes to the ``Keeper``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from ipaddress import IPv4Network
from typing import Any

import grpc
from aetcd import rpc
from aetcd.utils import prefix_range_end

from ..logonce import REPEAT_EVERY, Said
from ..model import Lease, LeaseAdded, LeaseError, LeaseEvent, LeaseRemoved, parse_subnet_key
from ..peers.base import Changes, Snapshot, Update
from ..supervise import own_cancellation
from .connection import RETRYABLE, CallCancelled, Client, Connection, within
from .cursor import WATCH_IDLE, Response, Step, Verdict, WatchCursor
from .keeper import Keeper
from .retry import Backoff
from .values import LeaseDecoder

log = logging.getLogger(__name__)

DECODE_CHUNK = 256  # lease values decoded between two turns of the event loop


class WatchFailed(Exception):
    """The watch stream ended, was cancelled, or went quiet; the cursor says whether to list again."""


class _Compacted(Exception):
    pass


def response(resp: Any) -> Response | None:
    """The cursor's view of an etcd WatchResponse (None for the end of the stream)."""
    if resp is grpc.aio.EOF:
        return None
    last = max((ev.kv.mod_revision for ev in resp.events), default=0)
    return Response(
        resp.header.revision, resp.created, resp.canceled, resp.cancel_reason, resp.compact_revision, last
    )


class WatchLoop:
    """Puts a ``Snapshot`` and then ``Changes`` on ``updates``; tells ``keeper`` about our key."""

    def __init__(
        self,
        conn: Connection,
        subnets_key: bytes,
        network: IPv4Network,
        decoder: LeaseDecoder,
        updates: asyncio.Queue[Update],
        keeper: Keeper,
        wake: asyncio.Event,
        idle: float = WATCH_IDLE,
    ) -> None:
        self.conn = conn
        self.subnets_key = subnets_key
        self.network = network
        self.decoder = decoder
        self.updates = updates
        self.keeper = keeper
        self.wake = wake
        self.idle = idle
        self.cursor = WatchCursor()
        self.timeout = conn.settings.timeout
        self._failures = Said(repeat=REPEAT_EVERY)

    async def run(self) -> None:
        """List and follow until cancelled; every failure is retried."""
        cursor = self.cursor
        backoff = Backoff()
        while True:
            client: Client | None = None
            try:
                client = await self.conn.client()
                if cursor.need_list:
                    leases, revision = await self.listing(client)
                    self.conn.reached()
                    cursor.listed(revision)
                    self.updates.put_nowait(Snapshot(leases))
                    if self.keeper.observed_listing(leases):
                        self.wake.set()
                await self._follow(client, backoff)
            except _Compacted as e:
                log.warning("the watch on %s %s", self.subnets_key.decode(), e)
                await asyncio.sleep(backoff.next())
            except RETRYABLE + (WatchFailed,) as e:
                await self.conn.retry_after(client, e, backoff)
            except asyncio.CancelledError:
                if own_cancellation():
                    raise
                # Another call closed the channel this watch ran on (it failed, or logged in
                # again): resume on the new connection, do not end.
                if client is not None and self.conn.replaced(client):
                    log.debug("the watch's connection was replaced; resuming the watch")
                    continue
                await self.conn.retry_after(client, CallCancelled("the watch call was cancelled"), backoff)
            except Exception as e:  # a bug: the traceback once, then one line a minute while it lasts
                if self._failures.due("watch", repr(e), time.monotonic()):
                    log.exception("the etcd watch failed; restarting it")
                cursor.compacted()
                await asyncio.sleep(backoff.next())

    async def listing(self, client: Client) -> tuple[tuple[Lease, ...], int]:
        """Every valid lease under the prefix, and the revision of the listing."""
        resp = await client.get_prefix(self.subnets_key)
        leases = []
        for count, kv in enumerate(resp.kvs, 1):
            if count % DECODE_CHUNK == 0:
                await asyncio.sleep(0)  # a listing of thousands must not stall the data path
            key = kv.key.decode(errors="replace")
            lease, message = self.decoder.decode(key, kv.value, self.network)
            _warn(message)
            if lease is not None:
                leases.append(lease)
        return tuple(leases), resp.header.revision

    def _judge(self, verdict: Verdict) -> bool:
        """Raise for a verdict that ends the stream; False for RELIST, True to go on."""
        if verdict.step is Step.COMPACTED:
            raise _Compacted(verdict.message)
        if verdict.step is Step.FAIL:
            raise WatchFailed(verdict.message)
        if verdict.step is Step.RELIST:
            log.warning("%s", verdict.message)
            return False
        return True

    async def _follow(self, client: Client, backoff: Backoff) -> None:
        """Watch from the cursor until something breaks (always raises, or returns to relist)."""
        cursor = self.cursor
        create = rpc.WatchCreateRequest(
            key=self.subnets_key,
            range_end=prefix_range_end(self.subnets_key),
            start_revision=cursor.start_revision(),
            progress_notify=True,
        )
        # Written with write()/read() rather than a request iterator: our side of the
        # stream stays open without a generator for gRPC to finalize on cancel.
        call = rpc.WatchStub(client.channel).Watch(metadata=client.metadata)
        try:
            await within(call.write(rpc.WatchRequest(create_request=create)), self.timeout)
            first = await within(call.read(), self.timeout)
            if not self._judge(cursor.first(response(first))):
                return
            self.conn.reached()
            backoff.reset()
            while True:
                resp = await self._read(call)
                self._judge(cursor.next(response(resp)))
                if resp.events:
                    # One response can hold thousands of events (a revoked lease shared by many
                    # keys): decode them in chunks and let the data path run in between.
                    for start in range(0, len(resp.events), DECODE_CHUNK):
                        if start:
                            await asyncio.sleep(0)
                        events = self._changes(resp.events[start : start + DECODE_CHUNK])
                        if events:
                            self.updates.put_nowait(Changes(tuple(events)))
                    cursor.seen(max(ev.kv.mod_revision for ev in resp.events))
        finally:
            call.cancel()

    async def _read(self, call: Any) -> Any:
        """The next watch response, or ``WatchFailed`` if the stream went quiet and stays so.

        A watch on a quiet prefix hears nothing, and so does one whose stream
        died without a reset (a stalled etcd, a lost quorum, a half-open
        TCP connection). After ``idle`` seconds of silence we ask etcd for a
        progress notification (WatchProgressRequest, etcd 3.4 and later); a
        live stream answers at once, a dead one is restarted from the cursor.
        """
        read = asyncio.ensure_future(call.read())
        try:
            done, _ = await asyncio.wait({read}, timeout=self.idle)
            if not done:
                log.debug("the watch was quiet for %gs; asking etcd for progress", self.idle)
                request = rpc.WatchRequest(progress_request=rpc.WatchProgressRequest())
                await within(call.write(request), self.timeout)
                done, _ = await asyncio.wait({read}, timeout=self.timeout)
                if not done:
                    raise WatchFailed(
                        f"the watch heard nothing for {self.idle:g}s and etcd did not answer "
                        f"a progress request within {self.timeout:g}s"
                    )
            return read.result()
        finally:
            if not read.done():
                read.cancel()

    def _changes(self, events: Any) -> list[LeaseEvent]:
        out: list[LeaseEvent] = []
        for ev in events:
            key = ev.kv.key.decode(errors="replace")
            try:
                subnet = parse_subnet_key(key)
            except LeaseError:
                _warn(self.decoder.decode(key, ev.kv.value)[1])
                continue
            lease: Lease | None = None
            if ev.type == rpc.Event.DELETE:
                self.decoder.forget(key)
            else:
                lease, message = self.decoder.decode(key, ev.kv.value, self.network, subnet)
                _warn(message)
            # A bad value replaces whatever was there: drop the old route rather than keep it.
            out.append(LeaseAdded(lease) if lease else LeaseRemoved(subnet))
            if self.keeper.observed(subnet, lease):
                self.wake.set()
        return out


def _warn(message: str | None) -> None:
    if message:
        log.warning("%s", message)
