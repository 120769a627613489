"""Retry pacing, pure: ``Backoff`` doubles a delay up to a cap; ``Throttle`` says a repeated error once."""

from __future__ import annotations


class Backoff:
    """Delays for retries: ``initial``, doubled each time up to ``cap``; ``reset()`` after a success."""

    def __init__(self, initial: float = 0.5, cap: float = 10.0, factor: float = 2.0) -> None:
        if not 0 < initial <= cap or factor < 1:
            raise ValueError("backoff needs 0 < initial <= cap and factor >= 1")
        self.initial = initial
        self.cap = cap
        self.factor = factor
        self._next = initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * self.factor)
        return delay

    def reset(self) -> None:
        self._next = self.initial


class Throttle:
    """Says whether to log a message: yes if it differs from the last one, or ``repeat`` s have passed."""

    def __init__(self, repeat: float = 60.0) -> None:
        self.repeat = repeat
        self._last: object = None
        self._at = 0.0

    def should_log(self, key: object, now: float) -> bool:
        if key != self._last or now - self._at >= self.repeat:
            self._last = key
            self._at = now
            return True
        return False

    def clear(self) -> None:
        self._last = None
