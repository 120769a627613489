"""Background tasks that must not end while the daemon runs.

A daemon made of loops (watch, lease keeper, config check, stats, periodic
check) is only as alive as its weakest loop: one that ends quietly leaves a
process that looks healthy and no longer does its job. Two rules here:

* ``own_cancellation()`` tells a cancellation of *this task* (the daemon is
  stopping) from a ``CancelledError`` raised by an awaited call because
  something else cancelled it, as gRPC's asyncio calls do when a failure
  elsewhere closes their channel. Only the first may end a loop.
* ``supervised()`` runs a loop that should never return; if it returns or
  raises anyway, ``TaskDied`` ends the daemon with one line naming the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

log = logging.getLogger("tunproxy")


class TaskDied(RuntimeError):
    """A background task of the daemon ended while the daemon was running; ``str()`` is one line."""


def own_cancellation() -> bool:
    """True if the running task itself is being cancelled (``Task.cancel()`` was called on it)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def supervised(name: str, loop: Awaitable[object]) -> None:
    """Await ``loop``, which must run until cancelled; raise ``TaskDied`` if it ends otherwise.

    The traceback of an unexpected exception is logged at debug level;
    the message names the task and the exception in one line.
    """
    try:
        await loop
    except asyncio.CancelledError:
        if own_cancellation():
            raise
        raise TaskDied(f"{name} stopped: a call it made was cancelled") from None
    except TaskDied:
        raise
    except Exception as e:
        log.debug("%s failed", name, exc_info=True)
        detail = " ".join(str(e).split()) or type(e).__name__
        raise TaskDied(f"{name} stopped: {detail}") from None
    raise TaskDied(f"{name} stopped although the daemon is running")
