"""The control socket: how ``tunproxy status`` and ``tunproxy drops`` ask a running daemon.

A Unix stream socket under ``/run/tunproxy/``. The protocol is one JSON line
each way: the client sends ``{"command": "status"}`` (or ``"drops"``), the
daemon answers with one JSON document and closes. Only root may ask: the
socket is mode 0600, and the daemon also checks the peer's uid with
SO_PEERCRED (unix(7)) in case the mode is loosened.

Several daemons may share one filesystem (labs run one per network namespace
on one machine), so the default path is keyed by the daemon's subnet file,
which already has to be unique per daemon: the default subnet file
``/run/tunproxy/subnet.env`` gives ``/run/tunproxy/tunproxy.sock``, any other
gives ``/run/tunproxy/tunproxy-<12 hex digits of its path's SHA-256>.sock``,
and none (``--subnet-file ''``) gives ``tunproxy-netns-<inode of the network
namespace>.sock``. ``--control-socket`` overrides them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .model import ConfigError

log = logging.getLogger(__name__)

RUN_DIR = Path("/run/tunproxy")
DEFAULT_SUBNET_FILE = RUN_DIR / "subnet.env"
MAX_REQUEST = 4096
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class NoDaemon(Exception):
    """No daemon answers on the control socket; the message is one line for the user."""


def default_socket(subnet_file: Path | None) -> Path:
    """The control socket path for a daemon writing ``subnet_file`` (see the module docstring)."""
    if subnet_file is None:
        # No file to key it by: key it by the network namespace, one daemon's natural scope,
        # so daemons of a lab (one per namespace) never share a socket.
        return RUN_DIR / f"tunproxy-netns-{os.stat('/proc/self/ns/net').st_ino}.sock"
    if Path(os.path.abspath(subnet_file)) == DEFAULT_SUBNET_FILE:
        return RUN_DIR / "tunproxy.sock"
    digest = hashlib.sha256(os.path.abspath(subnet_file).encode()).hexdigest()[:12]
    return RUN_DIR / f"tunproxy-{digest}.sock"


def _peer_uid(sock: socket.socket) -> int:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return int(_UCRED.unpack(raw)[1])


Handler = Callable[[dict[str, Any]], Any]


class ControlServer:
    """Serves ``handler(request) -> JSON-able`` on a Unix socket at ``path``, root only.

    ``start`` raises ConfigError when another daemon already answers on the
    path; a socket left by a killed daemon is replaced.
    """

    def __init__(self, path: Path, handler: Handler, allowed_uid: int = 0) -> None:
        self.path = path
        self.handler = handler
        self.allowed_uid = allowed_uid
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Binds the socket with mode 0600 (creating its directory) and starts answering."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise ConfigError(f"control socket {self.path} exists and is not a socket")
            if _answers(self.path):
                raise ConfigError(
                    f"control socket {self.path} is in use by another tunproxy "
                    "(give each daemon its own --subnet-file or --control-socket)"
                )
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)  # born 0600: there is no moment at which others may connect
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old)
            sock.listen(16)
        except OSError as e:
            sock.close()
            raise ConfigError(f"cannot create control socket {self.path}: {e.strerror}") from None
        sock.setblocking(False)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        log.info("control socket %s", self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None and _peer_uid(sock) not in (0, self.allowed_uid):
                writer.write(b'{"error": "permission denied: only root may ask tunproxy"}\n')
                return
            try:
                line = await asyncio.wait_for(reader.readline(), 5)
            except ValueError:  # longer than the stream's limit: a bad request, not a traceback
                line = b"\x00"
            try:
                request = json.loads(line[:MAX_REQUEST] or b"{}")
                if not isinstance(request, dict):
                    raise ValueError("not an object")
                answer = self.handler(request)
            except ValueError as e:
                answer = {"error": f"bad request: {e}"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass  # a client that went away is its own problem
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def close(self) -> None:
        """Stops answering and removes the socket file."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(OSError):
                await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(OSError):
                self.path.unlink()


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def find_sockets(directory: Path = RUN_DIR) -> list[Path]:
    """Control sockets in ``directory`` that a daemon answers on."""
    try:
        candidates = sorted(directory.glob("tunproxy*.sock"))
    except OSError:
        return []
    return [p for p in candidates if _answers(p)]


def resolve(explicit: str | None, subnet_file: str | None, directory: Path = RUN_DIR) -> Path:
    """The socket to ask: ``--control-socket``, else the one for ``--subnet-file``, else the only
    live one in ``directory``. Raises NoDaemon (one line) when none or several run."""
    if explicit:
        return Path(explicit)
    if subnet_file:
        return default_socket(Path(subnet_file))
    live = find_sockets(directory)
    if not live:
        raise NoDaemon(f"no tunproxy daemon is running (no control socket answers in {directory})")
    if len(live) > 1:
        names = ", ".join(str(p) for p in live)
        raise NoDaemon(f"{len(live)} tunproxy daemons run ({names}); choose one with --control-socket")
    return live[0]


def query(path: Path, command: str, timeout: float = 5.0, **args: Any) -> Any:
    """Ask the daemon at ``path``; returns its JSON answer.

    Raises NoDaemon when nothing answers there, PermissionError when we may
    not connect, and OSError for anything else on the socket.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise NoDaemon(f"no tunproxy daemon is running (nothing answers on {path})") from None
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM):
                raise PermissionError(e.errno, f"cannot connect to {path}: only root may ask") from None
            raise
        s.sendall(json.dumps({"command": command, **args}).encode() + b"\n")
        chunks = []
        while chunk := s.recv(1 << 16):
            chunks.append(chunk)
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        raise OSError(errno.EPROTO, f"the daemon at {path} sent something that is not JSON") from None
    if isinstance(answer, dict) and "error" in answer and len(answer) == 1:
        raise OSError(errno.EPROTO, f"the daemon at {path} says: {answer['error']}")
    return answer
