"""systemd's notify protocol (sd_notify(3)), without libsystemd.

With ``Type=notify`` systemd sets ``NOTIFY_SOCKET`` to a datagram socket (a
path, or an abstract name written with a leading ``@``); each notification is
one datagram of newline-separated ``KEY=VALUE`` lines. The daemon sends
``READY=1`` once its lease is held and its peers are programmed, ``STATUS=``
on every change of phase, ``STOPPING=1`` on shutdown and, when systemd set
``WATCHDOG_USEC``, ``WATCHDOG=1`` at half that interval (sd_watchdog_enabled(3)).
A notification that cannot be sent is logged once and otherwise ignored:
systemd being gone must not stop the overlay.
"""

from __future__ import annotations

import logging
import socket

from .logonce import Said

log = logging.getLogger("tunproxy")


def socket_address(value: str) -> str:
    """``NOTIFY_SOCKET``'s value as an AF_UNIX address (``@name`` is the abstract ``\\0name``)."""
    return "\0" + value[1:] if value.startswith("@") else value


class Notifier:
    """Sends notifications to ``NOTIFY_SOCKET`` ``address``."""

    def __init__(self, address: str) -> None:
        self.address = socket_address(address)
        self.sock: socket.socket | None = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
        )
        self._failure = Said()

    def send(self, message: str) -> bool:
        """Send one notification (lines of KEY=VALUE); False if it could not be sent."""
        if self.sock is None:
            return False
        try:
            self.sock.sendto(message.encode(), self.address)
        except OSError as e:
            if self._failure.due("send"):
                log.warning("cannot notify systemd at %s: %s", self.address.lstrip("\0"), e.strerror or e)
            return False
        self._failure.forget("send")
        return True

    def close(self) -> None:
        """Close the socket; later sends return False."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
