"""How many replicas a model should have: Knative's KPA rules on in-flight requests per replica.

Pure logic, driven by explicit timestamps (no clock inside), so tests run it on a fake clock.

- Demand is sampled each tick as in-flight + queued requests of the model.
- Stable mode: desired = ceil(mean demand over the stable window / target per replica).
- Panic mode: entered when the panic window's mean demand reaches `panic_threshold` x the ready
  capacity; desired then follows the panic window and never goes below the current count; left
  after a whole stable window without a reason to panic.
- Scale-down delay: the count used is the highest desired over the last `scale_down_delay_s`
  (immediate scale-up wishes, such as the first request at zero, count too), so a brief lull
  never removes a replica that is slow to bring back. The last replica goes the same way.
- Scale-down rate: at most current - floor(current / max_scale_down_rate) removed per step.
- Clamped to [floor, max_replicas], where floor is min_replicas (at least 1 without
  scale_to_zero).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import TypeVar

from fastboot.router.config import ModelConfig

T = TypeVar("T")


@dataclass(frozen=True)
class Decision:
    """One autoscaler verdict."""

    #: Replicas the model should have now.
    desired: int
    #: Whether panic mode is on.
    panic: bool
    #: Mean demand over the stable window.
    stable_demand: float
    #: Mean demand over the panic window.
    panic_demand: float


class Autoscaler:
    """One model's autoscaler state: demand samples, panic state, recent wishes."""

    def __init__(self, model: ModelConfig) -> None:
        self.model = model
        self._samples: deque[tuple[float, float]] = deque()
        self._wishes: deque[tuple[float, int]] = deque()
        self._last_panic_reason: float | None = None

    def observe(self, now: float, demand: float) -> None:
        """Record the model's demand (in-flight + queued requests) at `now`."""
        _record(self._samples, now, demand, self.model.stable_window_s)

    def want(self, now: float, count: int) -> None:
        """Record a wish for `count` replicas made outside a tick (e.g. scale from zero)."""
        self._wish(now, count)

    def _wish(self, now: float, count: int) -> None:
        _record(self._wishes, now, count, self.model.scale_down_delay_s)

    def _mean(self, now: float, window_s: float) -> float:
        horizon = now - window_s
        values = [d for t, d in self._samples if t >= horizon]
        return sum(values) / len(values) if values else 0.0

    def in_panic(self, now: float) -> bool:
        return (
            self._last_panic_reason is not None
            and now - self._last_panic_reason < self.model.stable_window_s
        )

    def decide(self, now: float, ready: int, current: int) -> Decision:
        """The desired replica count, given `ready` serving and `current` live or booting."""
        m = self.model
        target = m.target_per_replica
        stable = self._mean(now, m.stable_window_s)
        panic_demand = self._mean(now, m.panic_window_s)
        if panic_demand / (max(ready, 1) * target) >= m.panic_threshold:
            self._last_panic_reason = now
        panic = self.in_panic(now)
        if panic:
            raw = max(math.ceil(panic_demand / target), current)
        else:
            raw = math.ceil(stable / target)
        self._wish(now, raw)
        desired = max(count for _, count in self._wishes)
        if desired < current:
            desired = max(desired, math.floor(current / m.max_scale_down_rate))
        desired = min(max(desired, m.floor), m.max_replicas)
        return Decision(desired, panic, stable, panic_demand)


def _record(window: deque[tuple[float, T]], now: float, value: T, span_s: float) -> None:
    """Append (now, value) to a window ordered by time and drop what is older than span_s."""
    window.append((now, value))
    horizon = now - span_s
    while window and window[0][0] < horizon:
        window.popleft()
