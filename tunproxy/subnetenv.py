"""subnet.env written so that a failure at run time never stops forwarding.

At start a subnet.env that cannot be written stops the daemon with one line
(nothing is running yet that depends on us). At run time (our lease
re-acquired, the subnet changed) the data path is already forwarding: a
write that fails is one log line naming the file and the reason, and the
periodic check tries again until it succeeds, which is logged too.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("tunproxy")


def reason(error: OSError) -> str:
    """Why a write failed, in words: ``/run/x is not a directory``, ``Permission denied``."""
    if error.errno == errno.ENOTDIR and error.filename:
        return f"{error.filename} is not a directory"
    return error.strerror or str(error)


class SubnetEnv:
    """The subnet.env text waiting to be written to ``path`` with ``write(path, text)``."""

    def __init__(self, path: Path, write: Callable[[Path, str], None]) -> None:
        self.path = path
        self._write = write
        self._pending: str | None = None
        self._failed: str | None = None  # the reason last logged, so a retry does not repeat it

    def set(self, text: str, fatal: bool) -> None:
        """Write ``text`` now; ``fatal``: raise OSError on failure, else log it and keep it pending."""
        self._pending = text
        self.flush(fatal)

    def flush(self, fatal: bool = False) -> None:
        """Write the pending text, if any (the periodic check calls this)."""
        if self._pending is None:
            return
        try:
            self._write(self.path, self._pending)
        except OSError as e:
            if fatal:
                raise
            why = reason(e)
            if why != self._failed:
                log.error(
                    "cannot write the subnet file %s: %s; still forwarding, retrying at each check",
                    self.path,
                    why,
                )
            self._failed = why
            return
        if self._failed is not None:
            log.info("wrote the subnet file %s", self.path)
        self._pending = self._failed = None
