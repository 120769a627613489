"""The connection to etcd: endpoints tried in turn, TLS, authentication, retries; asyncio and gRPC.

``Connection`` holds one ``aetcd`` client at a time, to the current endpoint;
a failed call drops it and moves to the next endpoint. ``Connection.call``
retries a call across the endpoints with backoff (0.5 s doubling to 10 s)
until etcd answers, logging an outage once (and again each minute if it
changes) and its end once; an expired auth token is renewed at once, quietly.
``within``, ``settle`` and ``guarded`` keep a cancelled gRPC call from
hanging us (see each).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aetcd
import grpc
from aetcd import rpc

from ..logonce import REPEAT_EVERY, Said
from ..model import ConfigError
from ..supervise import own_cancellation
from .endpoints import DEFAULT_PREFIX, Endpoint, parse_endpoints
from .retry import Backoff

log = logging.getLogger(__name__)
T = TypeVar("T")



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


async def within(call: Awaitable[T], timeout: float) -> T:
    """``await call`` for at most ``timeout`` s (TimeoutError), never waiting on a cancelled gRPC call.

    ``asyncio.wait_for`` waits for the call it cancels to finish; a gRPC
    stream call cancelled at the wrong moment (SIGTERM just as a watch is
    created) may never finish, and the daemon would hang in shutdown. Here
    the call runs as its own task: our cancellation, or the timeout, only
    asks it to stop.
    """
    task = asyncio.ensure_future(call)
    task.add_done_callback(retrieve)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            raise TimeoutError(f"no answer within {timeout:g}s")
        return task.result()
    finally:
        if not task.done():
            task.cancel()


def retrieve(task: asyncio.Future[Any]) -> None:
    """Mark an abandoned task's outcome as seen, so asyncio does not log it at exit."""
    if not task.cancelled():
        task.exception()


async def settle(tasks: set[asyncio.Task[Any]], timeout: float) -> None:
    """Cancel ``tasks`` and give them ``timeout`` s to end; one stuck in a gRPC call is left behind."""
    for task in tasks:
        task.cancel()
        task.add_done_callback(retrieve)
    if tasks:
        _, stuck = await asyncio.wait(tasks, timeout=timeout)
        for task in stuck:
            log.debug("%s did not stop within %gs; leaving it", task.get_name(), timeout)


async def guarded(call: Awaitable[T]) -> T:
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
        names: Mapping[str, str] | None = None,
    ) -> EtcdSettings:
        """Validate and read everything up front, so a mistake stops us with one line at start.

        The one place the etcd flags are checked: pairs that go together,
        files that must be readable, PEM that TLS can use. ``names`` maps
        ``cafile``, ``certfile``, ``keyfile``, ``username`` and ``password`` to
        the flag or variable each came from (default ``--etcd-<name>``), so
        the ConfigError names what the user wrote.
        """
        label = {k: f"--etcd-{k}" for k in ("cafile", "certfile", "keyfile", "username", "password")}
        label.update(names or {})
        if bool(certfile) != bool(keyfile):
            raise ConfigError(f"{label['certfile']} and {label['keyfile']} go together")
        if bool(username) != bool(password):
            raise ConfigError(f"{label['username']} and {label['password']} go together")
        ca, cert, key = (
            _read(p, label[k]) for p, k in ((cafile, "cafile"), (certfile, "certfile"), (keyfile, "keyfile"))
        )
        _check_pem(cafile, certfile, keyfile, label)
        prefix = "/" + (prefix or DEFAULT_PREFIX).strip("/")
        return cls(
            parse_endpoints(endpoints, tls=bool(cafile or certfile)),
            prefix,
            ca,
            cert,
            key,
            username or None,
            password,
            timeout,
        )

    def urls(self) -> str:
        """The endpoints as ``http://host:port, ...``, for messages."""
        return ", ".join(e.url for e in self.endpoints)


def _check_pem(
    cafile: str | None, certfile: str | None, keyfile: str | None, label: Mapping[str, str]
) -> None:
    """PEM files TLS cannot use are one line naming the flag, not gRPC's C-core log lines later."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile:
        try:
            context.load_verify_locations(cafile=cafile)
        except (ssl.SSLError, ValueError):
            raise ConfigError(f"{label['cafile']} {cafile} holds no PEM certificate") from None
    if certfile and keyfile:
        try:
            context.load_cert_chain(certfile, keyfile)
        except (ssl.SSLError, ValueError):
            raise ConfigError(
                f"{label['certfile']} {certfile} and {label['keyfile']} {keyfile} are not a PEM "
                "certificate and its private key"
            ) from None


def _read(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None


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
    """An etcd auth token that is no longer valid (UNAUTHENTICATED): log in again on the same endpoint."""
    if isinstance(error, rpc.AioRpcError):
        return error.code() == rpc.StatusCode.UNAUTHENTICATED
    return isinstance(error, aetcd.exceptions.UnauthenticatedError)


class Client(aetcd.Client):
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
        """Opens the channel (TLS for https) and logs in if a user is set; a failed login raises."""
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


async def close_client(client: aetcd.Client | None) -> None:
    """Close ``client`` (None: nothing), waiting at most 5 s and ignoring every error: it is being dropped."""
    if client is None:
        return
    with contextlib.suppress(Exception, asyncio.TimeoutError):
        await asyncio.wait_for(client.close(), 5)


class Connection:
    """One client at a time, to the current endpoint; a failure drops it and moves to the next."""

    def __init__(self, settings: EtcdSettings) -> None:
        self.settings = settings
        self.index = 0
        self._client: Client | None = None
        self._failed_in_row = 0
        self._lock = asyncio.Lock()  # one connect at a time: authenticating awaits
        self.down = False  # we logged "unreachable" and have not logged "reachable again"
        self._said = Said(repeat=REPEAT_EVERY)  # a failure once, again if it changes or lasts

    @property
    def endpoint(self) -> Endpoint:
        """The endpoint the next client connects to."""
        return self.settings.endpoints[self.index]

    async def client(self) -> Client:
        """The current client, connecting (and logging in) first if there is none; connect errors raise."""
        async with self._lock:
            if self._client is None:
                client = Client(self.endpoint, self.settings)
                await client.connect()
                self._client = client
            return self._client

    async def failed(self, client: aetcd.Client | None) -> bool:
        """Drop ``client`` (if still current) and rotate; True once every endpoint failed in a row."""
        self._failed_in_row += 1
        if client is None or client is self._client:
            old, self._client = self._client, None
            self.index = (self.index + 1) % len(self.settings.endpoints)
            await close_client(old)
        return self._failed_in_row % len(self.settings.endpoints) == 0

    async def drop(self, client: aetcd.Client | None) -> None:
        """Reconnect to the same endpoint next time (e.g. to authenticate again)."""
        if client is not None and client is self._client:
            self._client = None
            await close_client(client)

    def replaced(self, client: aetcd.Client) -> bool:
        """True if ``client`` was dropped since it was handed out (by a failure or a new login)."""
        return client is not self._client

    def ok(self) -> bool:
        """A call succeeded; True if that ends an outage we had logged."""
        self._failed_in_row = 0
        was_down, self.down = self.down, False
        return was_down

    async def close(self) -> None:
        """Close the current client, if any."""
        old, self._client = self._client, None
        await close_client(old)

    async def call(self, fn: Callable[[Client], Awaitable[T]]) -> T:
        """``fn(client)``, retried across endpoints and with backoff until etcd answers."""
        backoff = Backoff()
        reauthenticated = False
        while True:
            client: Client | None = None
            try:
                client = await guarded(self.client())
                result = await guarded(fn(client))
            except RETRYABLE as e:
                if token_expired(e) and not reauthenticated:
                    # etcd's auth tokens expire when idle: log in again at once, quietly.
                    reauthenticated = True
                    log.debug("etcd at %s: %s; logging in again", self.endpoint.url, describe(e))
                    await self.drop(client)
                    continue
                await self.retry_after(client, e, backoff)
                continue
            self.reached()
            return result

    async def retry_after(self, client: aetcd.Client | None, error: BaseException, backoff: Backoff) -> None:
        """``client`` failed with ``error``: move to the next endpoint, or, once all failed, back off."""
        endpoint = self.endpoint
        if not await self.failed(client):
            log.debug("etcd at %s: %s; trying %s", endpoint.url, describe(error), self.endpoint.url)
            return
        delay = backoff.next()
        detail = describe(error)
        where = self.settings.urls()
        if self._said.due("failure", (where, detail), time.monotonic()):
            what = "unreachable" if unreachable(error) else "failed"
            log.warning("etcd at %s %s: %s, retrying in %gs", where, what, detail, delay)
            self.down = True
        await asyncio.sleep(delay)

    def reached(self) -> None:
        """A call succeeded: say so once if it ends an outage we logged."""
        if self.ok():
            self._said.forget("failure")
            log.info("etcd at %s reachable again", self.endpoint.url)
