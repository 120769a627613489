"""Retry pacing, pure: ``Backoff`` doubles a delay up to a cap (saying a repeated error once is
``tunproxy.logonce.Said``)."""

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
        """The delay to wait now, in ``initial``'s unit; the next is ``factor`` times it, at most ``cap``."""
        delay = self._next
        self._next = min(self.cap, self._next * self.factor)
        return delay

    def reset(self) -> None:
        """The next delay is ``initial`` again."""
        self._next = self.initial
