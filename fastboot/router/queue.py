"""A model's bounded FIFO of requests waiting for a replica slot.

A waiter is a future that the pool resolves with a replica whose in-flight count it already
incremented; a waiter whose client went away (its future cancelled) is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastboot.errors import FastbootError

if TYPE_CHECKING:
    from fastboot.router.upstream import RoutedReplica


class QueueFull(FastbootError):
    """The model's queue holds `queue_max` requests already (answered 429 + Retry-After)."""


class QueueTimeout(FastbootError):
    """No replica slot within the request's queue deadline (answered 503 with the reason)."""


@dataclass(eq=False)
class Waiter:
    """One queued request."""

    #: Resolved with the replica it may use.
    future: asyncio.Future[RoutedReplica]
    #: Its prefix keys, for the balancer.
    keys: list[int]
    #: Monotonic time it was queued.
    enqueued: float
    #: Whether its arrival started a scale-up from zero (its first token is a cold start).
    trigger: bool = field(default=False)


class RequestQueue:
    """FIFO with a bound; removal of a given waiter is O(n) but only on timeout/disconnect."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self._items: deque[Waiter] = deque()

    def __len__(self) -> int:
        return len(self._items)

    def push(self, waiter: Waiter) -> None:
        if len(self._items) >= self.bound:
            raise QueueFull
        self._items.append(waiter)

    def pop(self) -> Waiter | None:
        """The oldest waiter still waiting (skipping abandoned ones), or None."""
        while self._items:
            waiter = self._items.popleft()
            if not waiter.future.done():
                return waiter
        return None

    def remove(self, waiter: Waiter) -> None:
        with contextlib.suppress(ValueError):
            self._items.remove(waiter)

    def oldest_age(self, now: float) -> float:
        return now - self._items[0].enqueued if self._items else 0.0
