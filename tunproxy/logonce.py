"""Saying a thing once: the one rule behind every "log this once" and "once a minute".

A daemon that retries (a peer it cannot route, a file it cannot write, a
store that does not answer, a socket error on the data path) must not write
the same line on every retry, nor stay silent when the reason changes.
``Said`` remembers, per key, what was last said and when, and answers
whether a new line is due: the first time, when the text differs from the
last one said for that key, and again after ``repeat`` seconds (None:
never, until the key is forgotten). Pure: the time is a parameter.
"""

from __future__ import annotations

from collections.abc import Hashable

REPEAT_EVERY = 60.0
"""Seconds before a condition that persists (a check that keeps failing) is said again."""


class Said:
    """What was last said per key. ``due(key, text, now)`` records and answers; ``forget(key)`` resets."""

    def __init__(self, repeat: float | None = None) -> None:
        self.repeat = repeat
        self._last: dict[Hashable, tuple[object, float]] = {}

    def due(self, key: Hashable, text: object = None, now: float = 0.0) -> bool:
        """True if ``text`` is worth a line now for ``key`` (and remember that it was said).

        ``now`` is any monotonic clock in seconds; it matters only with ``repeat``.
        """
        last = self._last.get(key)
        if last is not None and last[0] == text:
            if self.repeat is None or now - last[1] < self.repeat:
                return False
        self._last[key] = (text, now)
        return True

    def get(self, key: Hashable, default: object = None) -> object:
        """The text last said for ``key``, or ``default``."""
        last = self._last.get(key)
        return default if last is None else last[0]

    def forget(self, key: Hashable) -> None:
        """The condition behind ``key`` is over: the next line about it is said again."""
        self._last.pop(key, None)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._last
