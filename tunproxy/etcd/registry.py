"""Leases in etcd v3, flannel's layout: the I/O around ``etcd_logic``.

How it works. ``<prefix>/config`` holds the network config; each host's
lease is ``<prefix>/subnets/10.100.5.0-24`` with flannel's JSON value,
attached to an etcd lease with the TTL. A key with no etcd lease is a
reservation: never taken by another host, used as is by the host it names.

* ``network_config()`` waits (with backoff, one log line per distinct
  problem) until etcd answers and the config is valid.
* ``acquire()`` lists the subnets, lets ``plan_acquisition`` choose, and
  writes with a transaction conditioned on the key's revision (or on its
  absence), so concurrent hosts never share a subnet; a lost race lists again.
  A keeper task then renews the lease ``renew_margin`` before it expires,
  and re-acquires (yielding ``OwnLease``) if our key is deleted, expires or
  is taken over.
* ``updates()`` lists (a ``Snapshot``), then watches from the listing's
  revision+1, turning each watch response into one ``Changes``. After a
  disconnect the watch resumes from the last revision seen+1; if that
  history was compacted (or the store went backwards) it lists again and
  yields a new ``Snapshot``, which the daemon's LeaseWatcher diffs.

While etcd is unreachable nothing fails: calls retry with backoff (0.5 s
to 10 s), trying the endpoints in turn, and ``updates()`` simply yields
nothing, so the daemon keeps forwarding with the table it has.

aetcd's own watcher hides the watch responses (their revisions, progress
notifications and cancellations), so the watch stream is driven directly
through aetcd's gRPC stubs; everything else goes through ``aetcd.Client``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, TypeVar

import aetcd
import grpc
from aetcd import rpc
from aetcd.utils import prefix_range_end

from ..model import (
    ConfigError,
    Lease,
    LeaseAdded,
    LeaseError,
    LeaseEvent,
    LeaseRemoved,
    NetworkConfig,
    parse_subnet_key,
    subnet_key,
)
from ..supervise import TaskDied, own_cancellation
from .base import Changes, OwnLease, Registry, Snapshot, Update
from .etcd_logic import (
    Backoff,
    Endpoint,
    Entry,
    LeaseDecoder,
    Plan,
    PlanKind,
    Throttle,
    WatchCursor,
    config_drift,
    effective_renew_margin,
    entry_from,
    format_leases,
    lease_row,
    parse_endpoints,
    plan_acquisition,
    previous_subnet,
    renew_delay,
)

__all__ = ["EtcdRegistry", "EtcdSettings", "etcd_settings", "format_leases", "list_leases"]

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PREFIX = "/coreos.com/network"
DEFAULT_TTL = 24 * 3600.0
DEFAULT_RENEW_MARGIN = 3600.0
REVOKE_RETRY = 10.0  # seconds between tries at revoking a lease we no longer use
SHUTDOWN_WAIT = 2.0  # seconds a background task gets to end once cancelled
DECODE_CHUNK = 256  # lease values decoded between two turns of the event loop


# gRPC channel options: notice a dead peer on an idle watch (etcd allows pings every 5 s or
# more with an open stream), and do not let the channel's own reconnect backoff reach minutes.
CHANNEL_OPTIONS = {
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 0,
    "grpc.initial_reconnect_backoff_ms": 500,
    "grpc.min_reconnect_backoff_ms": 500,
    "grpc.max_reconnect_backoff_ms": 5_000,
    # etcd batches a lagging watch's backlog into one response that can run to tens of MB;
    # gRPC's default 4 MiB limit failed it on every retry, and the watch never caught up.
    # etcd's Go client (clientv3 defaultMaxCallRecvMsgSize) takes up to math.MaxInt32.
    "grpc.max_receive_message_length": 2**31 - 1,
}


class CallCancelled(Exception):
    """A call was cancelled under us (its channel was closed by a failure elsewhere), not our task."""


async def _within(call: Awaitable[T], timeout: float) -> T:
    """``await call`` for at most ``timeout`` s (TimeoutError), never waiting on a cancelled gRPC call.

    ``asyncio.wait_for`` waits for the call it cancels to finish; a gRPC
    stream call cancelled at the wrong moment (SIGTERM just as a watch is
    created) may never finish, and the daemon would hang in shutdown. Here
    the call runs as its own task: our cancellation, or the timeout, only
    asks it to stop.
    """
    task = asyncio.ensure_future(call)
    task.add_done_callback(_retrieve)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            raise TimeoutError(f"no answer within {timeout:g}s")
        return task.result()
    finally:
        if not task.done():
            task.cancel()


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark an abandoned task's outcome as seen, so asyncio does not log it at exit."""
    if not task.cancelled():
        task.exception()


async def _settle(tasks: set[asyncio.Task[Any]], timeout: float) -> None:
    """Cancel ``tasks`` and give them ``timeout`` s to end; one stuck in a gRPC call is left behind."""
    for task in tasks:
        task.cancel()
        task.add_done_callback(_retrieve)
    if tasks:
        _, stuck = await asyncio.wait(tasks, timeout=timeout)
        for task in stuck:
            log.debug("%s did not stop within %gs; leaving it", task.get_name(), timeout)


async def _guarded(call: Awaitable[T]) -> T:
    """``await call``, turning a cancellation not aimed at this task into ``CallCancelled``."""
    try:
        return await call
    except asyncio.CancelledError:
        if own_cancellation():
            raise
        raise CallCancelled("the call was cancelled: its connection was closed") from None


# Any of these from a call means "this endpoint did not answer properly": rotate, back off, retry.
RETRYABLE: tuple[type[BaseException], ...] = (
    aetcd.ClientError,
    rpc.RpcError,
    OSError,
    EOFError,
    CallCancelled,
)


class WatchFailed(Exception):
    """The watch stream ended or was cancelled; ``relist`` if resuming it is not trustworthy."""

    def __init__(self, message: str, relist: bool = False) -> None:
        super().__init__(message)
        self.relist = relist


class _Compacted(Exception):
    def __init__(self, revision: int) -> None:
        super().__init__(f"revision compacted up to {revision}")
        self.revision = revision


@dataclass(frozen=True)
class EtcdSettings:
    """How to reach etcd: endpoints tried in turn, the key prefix, TLS and credentials."""

    endpoints: tuple[Endpoint, ...]
    prefix: str = DEFAULT_PREFIX
    ca: bytes | None = field(default=None, repr=False)
    cert: bytes | None = field(default=None, repr=False)
    key: bytes | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 5.0

    @classmethod
    def create(
        cls,
        endpoints: str,
        prefix: str = DEFAULT_PREFIX,
        cafile: str | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 5.0,
    ) -> EtcdSettings:
        """Validate and read everything up front, so a mistake stops us with one line at start."""
        if bool(certfile) != bool(keyfile):
            raise ConfigError("--etcd-certfile and --etcd-keyfile go together")
        if username and password is None:
            raise ConfigError("--etcd-username needs --etcd-password")
        if password and not username:
            raise ConfigError("--etcd-password needs --etcd-username")
        prefix = "/" + (prefix or DEFAULT_PREFIX).strip("/")
        return cls(
            parse_endpoints(endpoints, tls=bool(cafile or certfile)),
            prefix,
            _read(cafile, "--etcd-cafile"),
            _read(certfile, "--etcd-certfile"),
            _read(keyfile, "--etcd-keyfile"),
            username or None,
            password,
            timeout,
        )

    def urls(self) -> str:
        return ", ".join(e.url for e in self.endpoints)


def _read(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None


def etcd_settings(args: Any) -> EtcdSettings:
    """EtcdSettings from the command line (``--etcd-*``)."""
    return EtcdSettings.create(
        args.etcd_endpoints,
        getattr(args, "etcd_prefix", None) or DEFAULT_PREFIX,
        getattr(args, "etcd_cafile", None),
        getattr(args, "etcd_certfile", None),
        getattr(args, "etcd_keyfile", None),
        getattr(args, "etcd_username", None),
        getattr(args, "etcd_password", None),
    )


def describe(error: BaseException) -> str:
    """One line for an etcd error."""
    if isinstance(error, rpc.AioRpcError):
        text = error.details() or error.code().name
    elif isinstance(error, TimeoutError) and not str(error):
        text = "timed out"
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def unreachable(error: BaseException) -> bool:
    """A connectivity problem, as opposed to etcd answering with an error."""
    if isinstance(error, rpc.AioRpcError):
        return error.code() in (rpc.StatusCode.UNAVAILABLE, rpc.StatusCode.DEADLINE_EXCEEDED)
    return isinstance(error, (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError, OSError))


def token_expired(error: BaseException) -> bool:
    if isinstance(error, rpc.AioRpcError):
        return error.code() == rpc.StatusCode.UNAUTHENTICATED
    return isinstance(error, aetcd.exceptions.UnauthenticatedError)


class _Client(aetcd.Client):
    """aetcd.Client with TLS: aetcd opens only insecure channels, so connect() is ours."""

    def __init__(self, endpoint: Endpoint, settings: EtcdSettings) -> None:
        super().__init__(
            endpoint.host,
            endpoint.port,
            username=settings.username,
            password=settings.password,
            timeout=settings.timeout,  # type: ignore[arg-type]  # aetcd says int; grpc takes float
            options=CHANNEL_OPTIONS,
        )
        self.endpoint = endpoint
        self._credentials = None
        if endpoint.tls:
            self._credentials = grpc.ssl_channel_credentials(settings.ca, settings.key, settings.cert)

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        target = self.endpoint.target
        options = list(self._options.items())
        if self._credentials is not None:
            self.channel = rpc.secure_channel(target, self._credentials, options=options)
        else:
            self.channel = rpc.insecure_channel(target, options=options)
        if self._username is not None and self._password is not None:
            self.auth_stub = rpc.AuthStub(self.channel)
            request = rpc.AuthenticateRequest(name=self._username, password=self._password)
            try:
                resp = await self.auth_stub.Authenticate(request, timeout=self._timeout)
            except BaseException:
                await self.channel.close()
                self.channel = None
                raise
            self.metadata = (("token", resp.token),)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()


async def _close_client(client: aetcd.Client | None) -> None:
    if client is None:
        return
    with contextlib.suppress(Exception, asyncio.TimeoutError):
        await asyncio.wait_for(client.close(), 5)


class _Connection:
    """One client at a time, to the current endpoint; a failure drops it and moves to the next."""

    def __init__(self, settings: EtcdSettings) -> None:
        self.settings = settings
        self.index = 0
        self._client: _Client | None = None
        self._failed_in_row = 0
        self._lock = asyncio.Lock()  # one connect at a time: authenticating awaits
        self.down = False  # we logged "unreachable" and have not logged "reachable again"

    @property
    def endpoint(self) -> Endpoint:
        return self.settings.endpoints[self.index]

    async def client(self) -> _Client:
        async with self._lock:
            if self._client is None:
                client = _Client(self.endpoint, self.settings)
                await client.connect()
                self._client = client
            return self._client

    async def failed(self, client: aetcd.Client | None) -> bool:
        """Drop ``client`` (if still current) and rotate; True once every endpoint failed in a row."""
        self._failed_in_row += 1
        if client is None or client is self._client:
            old, self._client = self._client, None
            self.index = (self.index + 1) % len(self.settings.endpoints)
            await _close_client(old)
        return self._failed_in_row % len(self.settings.endpoints) == 0

    async def drop(self, client: aetcd.Client | None) -> None:
        """Reconnect to the same endpoint next time (e.g. to authenticate again)."""
        if client is not None and client is self._client:
            self._client = None
            await _close_client(client)

    def replaced(self, client: aetcd.Client) -> bool:
        """True if ``client`` was dropped since it was handed out (by a failure or a new login)."""
        return client is not self._client

    def ok(self) -> bool:
        """A call succeeded; True if that ends an outage we had logged."""
        self._failed_in_row = 0
        was_down, self.down = self.down, False
        return was_down

    async def close(self) -> None:
        old, self._client = self._client, None
        await _close_client(old)


@dataclass
class _Own:
    """Our lease as the keeper holds it."""

    lease: Lease
    etcd_lease: int  # 0: a reservation, nothing to renew
    renew_at: float = math.inf  # loop time
    expires_at: float | None = None  # Unix time; None: a reservation does not expire


class EtcdRegistry(Registry):
    """Leases and the network config in etcd v3, flannel's layout (see the module docstring)."""

    def __init__(
        self,
        settings: EtcdSettings,
        subnet_file: Path | None = None,
        ttl: float = DEFAULT_TTL,
        renew_margin: float = DEFAULT_RENEW_MARGIN,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.subnet_file = subnet_file
        self.ttl = max(1, math.ceil(ttl))
        self.renew_margin, warning = effective_renew_margin(self.ttl, renew_margin)
        if warning:
            log.warning("%s", warning)
        self.config_key = f"{settings.prefix}/config".encode()
        self.subnets_key = f"{settings.prefix}/subnets/".encode()
        self._conn = _Connection(settings)
        self._rng = rng or random.Random()
        self._config: NetworkConfig | None = None
        self._desired: Lease | None = None
        self._own: _Own | None = None
        self._updates: asyncio.Queue[Update] = asyncio.Queue()
        self._check_own = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self._watchers: set[asyncio.Task[None]] = set()
        self._decoder = LeaseDecoder()
        self._throttle = Throttle()
        self.config_poll = 10.0  # seconds between looks at the config, for drift only
        self.watch_idle = 30.0  # seconds of watch silence before asking etcd for progress
        self._to_revoke: set[int] = set()  # etcd leases we no longer use
        self.lease_problem: str | None = None  # set while our lease is lost and being re-acquired
        self._cursor: WatchCursor | None = None

    # --- what the daemon calls ----------------------------------------------

    @property
    def own_lease(self) -> Lease | None:
        """Our current lease (None before acquire)."""
        return self._own.lease if self._own else None

    def lease_expiry(self) -> float | None:
        return self._own.expires_at if self._own else None

    @property
    def own_etcd_lease(self) -> int | None:
        """The etcd lease ID our key is attached to; 0 for a reservation."""
        return self._own.etcd_lease if self._own else None

    @property
    def reachable(self) -> bool:
        """False from a failed call (after the endpoints were all tried) until the next one succeeds."""
        return not self._conn.down

    @property
    def watch_revision(self) -> int | None:
        """The etcd revision the watch has applied up to; None before the first listing."""
        return self._cursor.revision if self._cursor and self._cursor.revision else None

    async def network_config(self) -> NetworkConfig:
        if self._config is not None:
            return self._config
        backoff = Backoff(cap=5.0)  # one cheap read; notice a fix soon
        said: str | None = None
        key = self.config_key.decode()
        while True:
            kv = await self._call(lambda c: c.get(self.config_key))
            if kv is None:
                problem = f"no network config at {key} in etcd ({self.settings.urls()}); waiting for one"
            else:
                try:
                    config = NetworkConfig.parse(kv.value)
                except ConfigError as e:
                    problem = f"network config at {key} is unusable: {e}; waiting for a fix"
                else:
                    if said:
                        log.info("network config at %s is now usable", key)
                    log.info(
                        "network %s, subnets /%d from %s to %s, backend %s",
                        config.network,
                        config.subnet_len,
                        config.subnet_min,
                        config.subnet_max,
                        config.backend_type,
                    )
                    self._config = config
                    return config
            if problem != said:
                log.error("%s", problem)
                said = problem
            await asyncio.sleep(backoff.next())

    async def acquire(self, public_ip: IPv4Address, backend_type: str, backend_data: Any) -> Lease:
        config = await self.network_config()
        self._desired = Lease(config.network, public_ip, backend_type, backend_data)
        own = await self._acquire(self._previous_subnet())
        self._own = own
        await self._revoke_unused()
        if self._keeper is not None:
            self._keeper.cancel()
        self._keeper = asyncio.create_task(self._keep(), name="etcd-lease-keeper")
        return own.lease

    async def updates(self) -> AsyncIterator[Update]:
        await self.network_config()
        tasks = {
            asyncio.create_task(self._watch_loop(), name="etcd-watch"),
            asyncio.create_task(self._config_loop(), name="etcd-config"),
        }
        self._watchers |= tasks
        try:
            while True:
                yield await self._next_update()
        finally:
            self._watchers -= tasks
            await _settle(tasks, SHUTDOWN_WAIT)

    async def _next_update(self) -> Update:
        """The next update; ``TaskDied`` if the watch, config check or keeper ended on its own."""
        if not self._updates.empty():
            return self._updates.get_nowait()
        getter = asyncio.ensure_future(self._updates.get())
        background = {*self._watchers, *((self._keeper,) if self._keeper else ())}
        try:
            done, _ = await asyncio.wait({getter, *background}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            getter.cancel()
        if getter in done and not getter.cancelled():
            return getter.result()
        task = next(t for t in done if t is not getter)
        if task.cancelled():
            why = "it was cancelled"
        else:
            error = task.exception()
            why = describe(error) if error else "it returned"
        raise TaskDied(f"{task.get_name()} stopped: {why}")

    async def close(self) -> None:
        """Stop renewing and watching; the lease stays until it expires, so a restart keeps it."""
        tasks = {t for t in (self._keeper, *self._watchers) if t is not None}
        self._keeper = None
        await _settle(tasks, SHUTDOWN_WAIT)
        await self._conn.close()

    # --- calling etcd -----------------------------------------------------------

    async def _call(self, fn: Callable[[_Client], Awaitable[T]]) -> T:
        """``fn(client)``, retried across endpoints and with backoff until etcd answers."""
        backoff = Backoff()
        reauthenticated = False
        while True:
            client: _Client | None = None
            try:
                client = await _guarded(self._conn.client())
                result = await _guarded(fn(client))
            except RETRYABLE as e:
                if token_expired(e) and not reauthenticated:
                    # etcd's auth tokens expire when idle: log in again at once, quietly.
                    reauthenticated = True
                    log.debug("etcd at %s: %s; logging in again", self._conn.endpoint.url, describe(e))
                    await self._conn.drop(client)
                    continue
                await self._failed(client, e, backoff)
                continue
            self._reached()
            return result

    async def _failed(self, client: aetcd.Client | None, error: BaseException, backoff: Backoff) -> None:
        endpoint = self._conn.endpoint
        if not await self._conn.failed(client):
            log.debug("etcd at %s: %s; trying %s", endpoint.url, describe(error), self._conn.endpoint.url)
            return
        delay = backoff.next()
        detail = describe(error)
        where = self.settings.urls()
        if self._throttle.should_log((where, detail), time.monotonic()):
            what = "unreachable" if unreachable(error) else "failed"
            log.warning("etcd at %s %s: %s, retrying in %gs", where, what, detail, delay)
            self._conn.down = True
        await asyncio.sleep(delay)

    def _reached(self) -> None:
        if self._conn.ok():
            self._throttle.clear()
            log.info("etcd at %s reachable again", self._conn.endpoint.url)

    def _own_key(self, subnet: IPv4Network) -> bytes:
        return self.subnets_key + subnet_key(subnet).encode()

    # --- acquiring ------------------------------------------------------------------

    def _previous_subnet(self) -> IPv4Network | None:
        if self.subnet_file is None:
            return None
        try:
            text = self.subnet_file.read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("cannot read the previous subnet file %s: %s", self.subnet_file, e.strerror)
            return None
        except UnicodeDecodeError:
            log.warning("previous subnet file %s is not UTF-8 text; ignoring it", self.subnet_file)
            return None
        subnet = previous_subnet(text)
        if subnet is None:
            log.warning("previous subnet file %s has no usable FLANNEL_SUBNET; ignoring it", self.subnet_file)
        return subnet

    async def _entries(self, client: _Client) -> list[Entry]:
        resp = await client.get_prefix(self.subnets_key)
        entries = []
        for kv in resp.kvs:
            key = kv.key.decode(errors="replace")
            entry = entry_from(key, kv.value, kv.lease, kv.mod_revision)
            if entry is None or entry.lease is None:
                self._warn(self._decoder.decode(key, kv.value)[1])
            if entry is None:
                continue
            entries.append(entry)
        return entries

    async def _acquire(self, previous: IPv4Network | None) -> _Own:
        """Take a subnet (see plan_acquisition); raises ConfigError if none is free."""
        config, desired = self._config, self._desired
        assert config is not None and desired is not None
        races = 0
        while True:
            entries = await self._call(self._entries)
            plan = plan_acquisition(config, entries, desired, previous, self._rng)
            for stale in plan.stale:
                log.info("deleting our old lease %s: it does not fit the network config", stale.subnet)
                await self._call(functools.partial(self._delete_if_unchanged, entry=stale))
                self._unused(stale.etcd_lease)
            own = await self._call(functools.partial(self._write, plan=plan, desired=desired))
            if own is not None:
                how = {
                    PlanKind.CREATE: "leased",
                    PlanKind.RENEW: "reusing our lease on",
                    PlanKind.RESERVED: "using the reservation for",
                }[plan.kind]
                log.info("%s %s for %s (%s)", how, plan.subnet, desired.public_ip, desired.backend_type)
                return own
            races += 1
            log.info("lost a race for %s; choosing again", plan.subnet)
            await asyncio.sleep(self._rng.uniform(0, min(1.0, 0.02 * 2**races)))

    async def _delete_if_unchanged(self, client: _Client, entry: Entry) -> None:
        t = client.transactions
        key = self._own_key(entry.subnet)
        await client.transaction(
            compare=[t.mod(key) == entry.mod_revision], success=[t.delete(key)], failure=[]
        )

    async def _write(self, client: _Client, plan: Plan, desired: Lease) -> _Own | None:
        """Write the plan with a transaction; None if the key changed under us."""
        t = client.transactions
        key = self._own_key(plan.subnet)
        lease = dataclasses.replace(desired, subnet=plan.subnet)
        value = lease.to_json().encode()
        if plan.kind is PlanKind.RESERVED:
            if plan.write:
                ok, _ = await client.transaction(
                    compare=[t.mod(key) == plan.mod_revision], success=[t.put(key, value)], failure=[]
                )
                if not ok:
                    return None
            return _Own(lease, 0)
        grant = await client.lease(self.ttl)
        granted_at = asyncio.get_running_loop().time()
        compare = t.create(key) == 0 if plan.kind is PlanKind.CREATE else t.mod(key) == plan.mod_revision
        ok, _ = await client.transaction(
            compare=[compare], success=[t.put(key, value, lease=grant.id)], failure=[]
        )
        if not ok:
            with contextlib.suppress(*RETRYABLE):
                await client.revoke_lease(grant.id)
            return None
        if plan.kind is PlanKind.RENEW and plan.replaces != grant.id:
            self._unused(plan.replaces)  # the key moved to the new lease; the old one would linger
        renew_at = granted_at + renew_delay(grant.ttl, self.renew_margin)
        return _Own(lease, grant.id, renew_at, time.time() + grant.ttl)

    # --- keeping our lease -------------------------------------------------------------

    async def _keep(self) -> None:
        """Renew our lease in time; re-acquire if it is lost. Never returns, never raises."""
        backoff = Backoff()
        while True:
            try:
                await self._keep_once()
                backoff.reset()
            except asyncio.CancelledError:
                if own_cancellation():
                    raise
                log.warning("keeping our lease: a call was cancelled; retrying")
                await asyncio.sleep(backoff.next())
            except Exception:
                log.exception("keeping our lease failed; retrying")
                await asyncio.sleep(backoff.next())

    async def _keep_once(self) -> None:
        own = self._own
        assert own is not None
        if self._to_revoke:
            await self._revoke_unused()
        delay = own.renew_at - asyncio.get_running_loop().time()
        if self._to_revoke:
            delay = min(delay, REVOKE_RETRY)
        if not self._check_own.is_set() and delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._check_own.wait(), None if math.isinf(delay) else delay)
        if self._check_own.is_set():
            self._check_own.clear()
            still_ours = await self._verify_own(own)
        elif asyncio.get_running_loop().time() >= own.renew_at:
            still_ours = await self._renew(own)
        else:
            return
        if not still_ours:
            self.lease_problem = f"our lease on {own.lease.subnet} was lost; re-acquiring a subnet"
            self._own = await self._reacquire(own.lease.subnet)
            if own.etcd_lease != self._own.etcd_lease:
                self._unused(own.etcd_lease)
            self.lease_problem = None
            self._updates.put_nowait(OwnLease(self._own.lease))

    async def _renew(self, own: _Own) -> bool:
        reply = await self._call(lambda c: c.refresh_lease(own.etcd_lease))
        ttl = getattr(reply, "TTL", 0) if reply is not None else 0
        if ttl <= 0:
            log.warning("our lease on %s expired in etcd; acquiring a subnet again", own.lease.subnet)
            return False
        own.renew_at = asyncio.get_running_loop().time() + renew_delay(ttl, self.renew_margin)
        own.expires_at = time.time() + ttl
        log.debug("renewed our lease on %s for %ds", own.lease.subnet, ttl)
        return True

    async def _verify_own(self, own: _Own) -> bool:
        """The watch saw something happen to our key: is it still ours?"""
        subnet = own.lease.subnet
        kv = await self._call(lambda c: c.get(self._own_key(subnet)))
        if kv is None:
            log.warning("our lease on %s was deleted from etcd; acquiring a subnet again", subnet)
            return False
        lease, _ = self._decoder.decode(kv.key.decode(errors="replace"), kv.value)
        if lease is None or lease.public_ip != own.lease.public_ip:
            who = lease.public_ip if lease else "an unreadable value"
            log.warning("our subnet %s now names %s in etcd; acquiring another", subnet, who)
            return False
        if kv.lease != own.etcd_lease:
            # Someone re-put it for us (an operator, or a second copy of us): follow that.
            log.info("our key %s is now on etcd lease %x", subnet, kv.lease)
            self._unused(own.etcd_lease)
            own.etcd_lease = kv.lease
            own.renew_at = asyncio.get_running_loop().time() if kv.lease else math.inf
        return True

    def _unused(self, etcd_lease: int) -> None:
        """We stopped using ``etcd_lease`` (0: none): revoke it soon, or it lives out its TTL."""
        if etcd_lease:
            self._to_revoke.add(etcd_lease)

    async def _revoke_unused(self) -> None:
        """One try at revoking each lease we stopped using; what fails is tried again later.

        A lease that still has keys is left alone: someone re-attached a key
        to it, and revoking it would delete that key.
        """
        for lease_id in sorted(self._to_revoke):
            client: _Client | None = None
            try:
                client = await _guarded(self._conn.client())
                info = await _guarded(client.get_lease_info(lease_id, keys=True))
                if info.TTL == -1:
                    log.debug("etcd lease %x is already gone", lease_id)
                elif info.keys:
                    log.info("not revoking etcd lease %x: it holds %d key(s) now", lease_id, len(info.keys))
                else:
                    await _guarded(client.revoke_lease(lease_id))
                    log.info("revoked etcd lease %x, which we no longer use", lease_id)
                self._to_revoke.discard(lease_id)
            except RETRYABLE as e:
                log.debug("revoking etcd lease %x failed (%s); trying again later", lease_id, describe(e))
                return

    async def _reacquire(self, previous: IPv4Network) -> _Own:
        backoff = Backoff(cap=30.0)
        said = None
        while True:
            try:
                return await self._acquire(previous)
            except ConfigError as e:
                if str(e) != said:
                    log.error("cannot acquire a subnet again: %s; retrying", e)
                    said = str(e)
                await asyncio.sleep(backoff.next())

    # --- watching ---------------------------------------------------------------

    def _warn(self, message: str | None) -> None:
        if message:
            log.warning("%s", message)

    async def _list(self, client: _Client) -> tuple[tuple[Lease, ...], int]:
        assert self._config is not None
        resp = await client.get_prefix(self.subnets_key)
        leases = []
        for count, kv in enumerate(resp.kvs, 1):
            if count % DECODE_CHUNK == 0:
                await asyncio.sleep(0)  # a listing of thousands must not stall the data path
            key = kv.key.decode(errors="replace")
            lease, message = self._decoder.decode(key, kv.value, self._config.network)
            self._warn(message)
            if lease is not None:
                leases.append(lease)
        return tuple(leases), resp.header.revision

    async def _config_loop(self) -> None:
        """Re-read the config now and then, to say (once per change) that a change is not applied."""
        assert self._config is not None
        said: str | None = None
        while True:
            await asyncio.sleep(self.config_poll)
            try:
                kv = await self._call(lambda c: c.get(self.config_key))
            except Exception as e:  # never end the loop over one bad look
                log.warning("checking the network config in etcd failed: %s", describe(e))
                continue
            drift = config_drift(self._config, kv.value if kv is not None else None)
            if drift and drift != said:
                log.error("%s", drift)
            said = drift

    async def _watch_loop(self) -> None:
        cursor = self._cursor = WatchCursor()
        backoff = Backoff()
        while True:
            client: _Client | None = None
            try:
                client = await self._conn.client()
                if cursor.need_list:
                    leases, revision = await self._list(client)
                    self._reached()
                    cursor.listed(revision)
                    self._updates.put_nowait(Snapshot(leases))
                    self._check_snapshot(leases)
                await self._follow(client, cursor, backoff)
            except _Compacted as e:
                log.warning(
                    "the watch on %s missed history compacted up to revision %d (we had %d); listing again",
                    self.subnets_key.decode(),
                    e.revision,
                    cursor.revision,
                )
                cursor.compacted()
                await asyncio.sleep(backoff.next())
            except WatchFailed as e:
                if e.relist:
                    cursor.compacted()
                await self._failed(client, e, backoff)
            except RETRYABLE as e:
                await self._failed(client, e, backoff)
            except asyncio.CancelledError:
                if own_cancellation():
                    raise
                # Another call closed the channel this watch ran on (it failed, or logged in
                # again): resume on the new connection, do not end.
                if client is not None and self._conn.replaced(client):
                    log.debug("the watch's connection was replaced; resuming the watch")
                    continue
                await self._failed(client, CallCancelled("the watch call was cancelled"), backoff)
            except Exception:
                log.exception("the etcd watch failed; restarting it")
                cursor.compacted()
                await asyncio.sleep(backoff.next())

    async def _follow(self, client: _Client, cursor: WatchCursor, backoff: Backoff) -> None:
        """Watch from the cursor until something breaks (always raises, or returns to relist)."""
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
            await _within(call.write(rpc.WatchRequest(create_request=create)), self.settings.timeout)
            first = await _within(call.read(), self.settings.timeout)
            if first is grpc.aio.EOF:
                raise WatchFailed("the watch stream closed before it started")
            if first.compact_revision:
                raise _Compacted(first.compact_revision)
            if first.canceled or not first.created:
                raise WatchFailed(f"etcd refused the watch: {first.cancel_reason or 'no reason given'}", True)
            if not cursor.store_at(first.header.revision):
                log.warning(
                    "etcd is at revision %d, behind the %d we had seen (restored from a backup?); "
                    "listing again",
                    first.header.revision,
                    cursor.revision,
                )
                return
            self._reached()
            backoff.reset()
            while (resp := await self._read_watch(call)) is not grpc.aio.EOF:
                if resp.compact_revision:
                    raise _Compacted(resp.compact_revision)
                if resp.canceled:
                    reason = resp.cancel_reason or "no reason given"
                    raise WatchFailed(f"etcd cancelled the watch: {reason}", relist=True)
                if resp.events:
                    # One response can hold thousands of events (a revoked lease shared by many
                    # keys): decode them in chunks and let the data path run in between.
                    for start in range(0, len(resp.events), DECODE_CHUNK):
                        if start:
                            await asyncio.sleep(0)
                        events = self._changes(resp.events[start : start + DECODE_CHUNK])
                        if events:
                            self._updates.put_nowait(Changes(tuple(events)))
                    cursor.seen(max(ev.kv.mod_revision for ev in resp.events))
                else:
                    cursor.seen(resp.header.revision)  # a progress notification
            raise WatchFailed("the watch stream ended")
        finally:
            call.cancel()

    async def _read_watch(self, call: Any) -> Any:
        """The next watch response, or ``WatchFailed`` if the stream went quiet and stays so.

        A watch on a quiet prefix hears nothing, and so does one whose stream
        died without a reset (a stalled etcd, a lost quorum, a half-open
        TCP connection). After ``watch_idle`` seconds of silence we ask etcd
        for a progress notification (WatchProgressRequest, etcd 3.4 and
        later); a live stream answers at once, a dead one is restarted from
        the cursor.
        """
        read = asyncio.ensure_future(call.read())
        try:
            done, _ = await asyncio.wait({read}, timeout=self.watch_idle)
            if not done:
                log.debug("the watch was quiet for %gs; asking etcd for progress", self.watch_idle)
                request = rpc.WatchRequest(progress_request=rpc.WatchProgressRequest())
                await _within(call.write(request), self.settings.timeout)
                done, _ = await asyncio.wait({read}, timeout=self.settings.timeout)
                if not done:
                    raise WatchFailed(
                        f"the watch heard nothing for {self.watch_idle:g}s and etcd did not answer "
                        f"a progress request within {self.settings.timeout:g}s"
                    )
            return read.result()
        finally:
            if not read.done():
                read.cancel()

    def _changes(self, events: Any) -> list[LeaseEvent]:
        assert self._config is not None
        out: list[LeaseEvent] = []
        for ev in events:
            key = ev.kv.key.decode(errors="replace")
            try:
                subnet = parse_subnet_key(key)
            except LeaseError:
                self._warn(self._decoder.decode(key, ev.kv.value)[1])
                continue
            lease: Lease | None = None
            if ev.type == rpc.Event.DELETE:
                self._decoder.forget(key)
            else:
                lease, message = self._decoder.decode(key, ev.kv.value, self._config.network)
                self._warn(message)
            # A bad value replaces whatever was there: drop the old route rather than keep it.
            out.append(LeaseAdded(lease) if lease else LeaseRemoved(subnet))
            own = self._own
            if own is not None and subnet == own.lease.subnet:
                if lease is None or lease.public_ip != own.lease.public_ip:
                    self._check_own.set()
        return out

    def _check_snapshot(self, leases: tuple[Lease, ...]) -> None:
        own = self._own
        if own is None:
            return
        for lease in leases:
            if lease.subnet == own.lease.subnet:
                if lease.public_ip != own.lease.public_ip:
                    self._check_own.set()
                return
        self._check_own.set()


async def list_leases(settings: EtcdSettings) -> list[dict[str, Any]]:
    """Every lease under the prefix, as JSON-able dicts; tries each endpoint once.

    ``ttl_left`` is the seconds until the etcd lease expires, or None for a
    reservation. Raises ConnectionError naming the endpoints if none answers.
    """
    errors = []
    decoder = LeaseDecoder()
    prefix = f"{settings.prefix}/subnets/".encode()
    for endpoint in settings.endpoints:
        client = _Client(endpoint, settings)
        try:
            await client.connect()
            resp = await client.get_prefix(prefix)
            rows = []
            ttls: dict[int, int] = {}
            for kv in resp.kvs:
                lease, message = decoder.decode(kv.key.decode(errors="replace"), kv.value)
                if lease is None:
                    if message:
                        log.warning("%s", message)
                    continue
                ttl_left: int | None = None
                if kv.lease:
                    if kv.lease not in ttls:
                        info = await client.get_lease_info(kv.lease, keys=False)
                        ttls[kv.lease] = max(0, info.TTL)
                    ttl_left = ttls[kv.lease]
                rows.append((lease, ttl_left))
            rows.sort(key=lambda r: r[0].subnet)
            return [lease_row(lease, ttl) for lease, ttl in rows]
        except RETRYABLE as e:
            errors.append(f"{endpoint.url}: {describe(e)}")
        finally:
            await _close_client(client)
    raise ConnectionError(f"etcd unreachable ({'; '.join(errors)})")
