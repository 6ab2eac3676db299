"""One model's replicas and queue: admission, dispatch and release of request slots.

All methods run on the event loop and never await while they change state, so in-flight counts
and the queue stay consistent without locks.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from fastboot.router.autoscaler import Autoscaler
from fastboot.router.balancer import Balancer
from fastboot.router.config import ModelConfig
from fastboot.router.metrics import RouterMetrics
from fastboot.router.queue import QueueFull, QueueTimeout, RequestQueue, Waiter
from fastboot.router.upstream import BOOTING, DRAINING, GONE, READY, RoutedReplica

__all__ = ["ModelPool", "QueueFull", "QueueTimeout"]


class ModelPool:
    """Replicas, queue and autoscaler of one model."""

    def __init__(
        self,
        config: ModelConfig,
        balancer: Balancer,
        metrics: RouterMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.name = config.name
        self.balancer = balancer
        self.metrics = metrics
        self.clock = clock
        self.replicas: dict[str, RoutedReplica] = {}
        self.queue = RequestQueue(config.queue_max)
        self.autoscaler = Autoscaler(config)
        #: Placements asked of agents that have no replica yet.
        self.pending = 0
        #: Boots that failed in a row (reset when one is ready); paces replacements.
        self.boot_failures = 0
        #: RoutedReplica count the pool is being driven to (autoscaler and immediate wishes).
        self.target = config.floor
        #: Why the last placement or replica failed, for 503 messages.
        self.last_error: str | None = None
        #: Called with (pool, count) to start `count` placements now; set by the Router.
        self.scale_up: Callable[[ModelPool, int], None] = lambda pool, count: None
        #: Called with (pool, replica) when a draining replica has finished; set by the Router.
        self.retire: Callable[[ModelPool, RoutedReplica], None] = lambda pool, replica: None
        self._queue_depth = metrics.queue_depth.labels(config.name)
        self._queue_wait = metrics.queue_wait.labels(config.name)
        self._prefix = {d: metrics.prefix_route.labels(d) for d in ("hit", "miss", "imbalanced")}
        # Requests in the pool (queued or in flight) and its time integral since the last tick:
        # the autoscaler gets the time-weighted mean, so requests shorter than a tick count.
        self._level = 0
        self._area = 0.0
        self._mark = self._window = clock()

    # --- counts ----------------------------------------------------------------------------

    def ready(self) -> list[RoutedReplica]:
        return [r for r in self.replicas.values() if r.state == READY]

    def live(self) -> list[RoutedReplica]:
        """Replicas that serve or will: booting and ready (not draining or failed)."""
        return [r for r in self.replicas.values() if r.state in (BOOTING, READY)]

    def current(self) -> int:
        """Live replicas plus placements under way."""
        return len(self.live()) + self.pending

    def inflight(self) -> int:
        return sum(r.inflight for r in self.replicas.values())

    def demand(self) -> int:
        """In-flight plus queued requests now."""
        return self._level

    def demand_average(self) -> float:
        """Time-weighted mean demand since the last call: the autoscaler's signal."""
        now = self.clock()
        area = self._area + self._level * (now - self._mark)
        span = now - self._window
        self._area, self._mark, self._window = 0.0, now, now
        return area / span if span > 0 else float(self._level)

    def _change(self, delta: int) -> None:
        now = self.clock()
        self._area += self._level * (now - self._mark)
        self._mark = now
        self._level += delta

    # --- admission -------------------------------------------------------------------------

    def _take(self, keys: list[int]) -> RoutedReplica | None:
        candidates = [r for r in self.replicas.values() if r.has_room]
        if not candidates:
            return None
        replica, decision = self.balancer.choose(candidates, keys, self.clock())
        if len(candidates) > 1 and keys:
            self._prefix[decision].inc()
        replica.inflight += 1
        return replica

    async def acquire(
        self, keys: list[int], deadline: float
    ) -> tuple[RoutedReplica, Waiter | None]:
        """A replica slot (in-flight already counted) and the waiter if the request queued.

        Raises QueueFull at once when the queue is at its bound, QueueTimeout at `deadline`.
        """
        self._change(+1)
        if not self.queue and (replica := self._take(keys)) is not None:
            return replica, None
        now = self.clock()
        waiter = Waiter(asyncio.get_running_loop().create_future(), keys, now)
        try:
            self.queue.push(waiter)
        except QueueFull:
            self._change(-1)
            raise
        self._queue_depth.set(len(self.queue))
        future = waiter.future
        try:
            self.need_capacity(waiter)
            async with asyncio.timeout(max(0.0, deadline - now)):
                replica = await future
        except TimeoutError:
            if not (future.done() and not future.cancelled() and future.exception() is None):
                self._change(-1)
                raise QueueTimeout(self.unavailable_reason()) from None
            replica = future.result()  # the slot came as the deadline struck: use it
        except BaseException:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result())
            else:
                self._change(-1)
            raise
        finally:
            self.queue.remove(waiter)
            self._queue_depth.set(len(self.queue))
        self._queue_wait.observe(self.clock() - waiter.enqueued)
        return replica, waiter

    def unavailable_reason(self) -> str:
        if self.last_error:
            return self.last_error
        if self.pending or any(r.state == BOOTING for r in self.replicas.values()):
            return "its replica is still booting"
        if self.replicas:
            return "every replica is at its concurrency cap"
        return "no replica could be started"

    def need_capacity(self, waiter: Waiter | None = None) -> None:
        """Start placements now if the demand exceeds what live and booting replicas can take.

        The first request of a model at zero starts exactly one placement (concurrent ones
        merge, as they see it pending); later ones add replicas only past the hard caps.
        """
        current = self.current()
        if current >= self.config.max_replicas:
            return
        needed = min(
            self.config.max_replicas,
            max(1, math.ceil(self.demand() / self.config.concurrency), self.target),
        )
        if needed <= current:
            return
        if waiter is not None and not self.ready() and current == 0:
            waiter.trigger = True
        self.target = max(self.target, needed)
        self.autoscaler.want(self.clock(), needed)
        self.scale_up(self, needed - current)

    def dispatch(self) -> None:
        """Hand free replica slots to queued requests, oldest first."""
        while self.queue:
            candidates = [r for r in self.replicas.values() if r.has_room]
            if not candidates:
                return
            waiter = self.queue.pop()
            if waiter is None:
                return
            replica, _ = self.balancer.choose(candidates, waiter.keys, self.clock())
            replica.inflight += 1
            waiter.future.set_result(replica)

    def release(self, replica: RoutedReplica) -> None:
        """A request on `replica` finished (in any way)."""
        replica.inflight -= 1
        self._change(-1)
        replica.last_active = self._mark
        if replica.state in (DRAINING, GONE) and replica.inflight == 0:
            self.retire(self, replica)
        elif self.queue:
            self.dispatch()

    def retry_after_s(self) -> int:
        """A Retry-After hint for 429: a second when replicas serve, longer while booting."""
        return 1 if self.ready() else 5
