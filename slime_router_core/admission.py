"""Admission control: a bound on the generations in flight through the router, with a bounded wait queue.

``--max-concurrent-requests N`` (0: unlimited, the default), ``--max-queued-requests M``, ``--queue-timeout S``.
A generation (``POST /generate`` from its body read to its response finished, streams included; a plugin's
``Router.generate`` / ``Router.generate_stream``) takes a slot. With N slots taken, up to M more wait in a FIFO
queue for at most S seconds each; beyond the queue, or after waiting S seconds, the answer is 429 with
``Retry-After``. A waiting request holds only its (parsed) body: no worker, no upstream connection.

Everything runs on the router's event loop, with no await between a check and its update: no lock is needed.
Unlimited, admission is two integer operations per request (the in-flight count is kept for the metrics).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import Any

from .errors import HTTPError

OVERLOAD_TYPE = "overloaded_error"


class Admission:
    """The slots of ``--max-concurrent-requests`` and the queue of ``--max-queued-requests``.

    Use: ``if not adm.try_acquire(): await adm.wait()`` then, exactly once when done, ``adm.release()``.
    ``wait`` raises ``HTTPError(429)`` (with a ``Retry-After`` header) when the request is refused.
    """

    __slots__ = ("limit", "max_queued", "queue_timeout", "in_flight", "rejected", "rejected_queue_full",
                 "rejected_timeout", "admitted_after_wait", "_waiters")

    def __init__(self, limit: int = 0, max_queued: int = 0, queue_timeout: float = 30.0) -> None:
        if limit < 0 or max_queued < 0 or queue_timeout < 0:
            raise ValueError("admission limits must be >= 0")
        self.limit = limit  # 0: unlimited
        self.max_queued = max_queued
        self.queue_timeout = queue_timeout
        self.in_flight = 0  # generations holding a slot (also counted when unlimited)
        self.rejected = 0  # 429s answered (queue full + queue timeout)
        self.rejected_queue_full = 0
        self.rejected_timeout = 0
        self.admitted_after_wait = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    # --- the request path ----------------------------------------------------------------------------------

    def try_acquire(self) -> bool:
        """Take a slot now if one is free (no await); False: the caller must ``await wait()``."""
        if not self.limit or self.in_flight < self.limit:
            self.in_flight += 1
            return True
        return False

    async def wait(self) -> None:
        """Queue for a slot (FIFO); raise 429 when the queue is full or after ``queue_timeout`` seconds.

        On return the caller holds a slot (``release`` it). Cancelled while queued (client gone): no slot is
        kept, and a slot handed over at that very moment is passed on to the next waiter.
        """
        if len(self._waiters) >= self.max_queued:
            self.rejected += 1
            self.rejected_queue_full += 1
            raise self._refusal(queue_full=True)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append(fut)
        timer = loop.call_later(self.queue_timeout, self._expire, fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release()  # granted a slot, then cancelled before it could run: pass the slot on
            else:  # cancelled while waiting (the task's cancel cancels ``fut`` too) or refused
                fut.cancel()
                self._remove(fut)
            raise
        finally:
            timer.cancel()
        self.admitted_after_wait += 1

    def release(self) -> None:
        """Give a slot back: handed straight to the oldest waiter (FIFO), else freed."""
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot changes hands: in_flight unchanged
                return
        self.in_flight -= 1

    # --- internals -------------------------------------------------------------------------------------------

    def _remove(self, fut: asyncio.Future[None]) -> None:
        try:
            self._waiters.remove(fut)  # O(M), only on a timeout or a cancellation
        except ValueError:
            pass

    def _expire(self, fut: asyncio.Future[None]) -> None:
        if fut.done():
            return
        self._remove(fut)
        self.rejected += 1
        self.rejected_timeout += 1
        fut.set_exception(self._refusal(queue_full=False))

    def retry_after(self) -> int:
        """Seconds a refused client should wait (an integer >= 1): about one queue wait, capped at a minute."""
        return max(1, min(60, math.ceil(self.queue_timeout))) if self.max_queued else 1

    def _refusal(self, *, queue_full: bool) -> HTTPError:
        retry = self.retry_after()
        if queue_full:
            why = (f"{self.in_flight} generations in flight (--max-concurrent-requests {self.limit}) and "
                   f"{len(self._waiters)} waiting (--max-queued-requests {self.max_queued})")
            code = "queue_full"
        else:
            why = (f"waited {self.queue_timeout:g} s in the queue (--queue-timeout {self.queue_timeout:g}) behind "
                   f"{self.in_flight} generations in flight (--max-concurrent-requests {self.limit})")
            code = "queue_timeout"
        return HTTPError(429, f"Router overloaded: {why}. Retry after {retry} s, or raise the limits "
                              f"(--max-concurrent-requests, --max-queued-requests, --queue-timeout).",
                         type=OVERLOAD_TYPE, code=code, headers={"Retry-After": str(retry)})

    # --- what the metrics read -------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def stats(self) -> dict[str, Any]:
        """The counters, for ``/metrics`` and ``/health``: in_flight, queued, rejected (+ the split and limits)."""
        return {"in_flight": self.in_flight, "queued": len(self._waiters), "rejected": self.rejected,
                "rejected_queue_full": self.rejected_queue_full, "rejected_queue_timeout": self.rejected_timeout,
                "admitted_after_wait": self.admitted_after_wait, "max_concurrent_requests": self.limit,
                "max_queued_requests": self.max_queued, "queue_timeout": self.queue_timeout}
