"""The autoscaler's decisions on a fake clock (Knative KPA rules, fastboot.router.autoscaler)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from fastboot.router.autoscaler import Autoscaler
from fastboot.router.balancer import Balancer
from fastboot.router.config import ModelConfig
from fastboot.router.metrics import RouterMetrics
from fastboot.router.pool import ModelPool
from fastboot.router.upstream import READY, RoutedReplica

BASE = ModelConfig(
    name="m",
    snapshot="s",
    max_replicas=10,
    concurrency=10,  # target 7 per replica at 70 %
    stable_window_s=60,
    panic_window_s=6,
    scale_down_delay_s=300,
)


def feed(scaler: Autoscaler, start: float, end: float, demand: float, step: float = 2.0) -> float:
    t = start
    while t <= end:
        scaler.observe(t, demand)
        t += step
    return t - step


def test_idle_model_at_zero_stays_at_zero() -> None:
    scaler = Autoscaler(BASE)
    feed(scaler, 0, 60, 0)
    assert scaler.decide(60, ready=0, current=0).desired == 0


def test_one_queued_request_at_zero_wants_one_replica() -> None:
    scaler = Autoscaler(BASE)
    scaler.observe(0, 1)
    assert scaler.decide(0, ready=0, current=0).desired == 1


def test_stable_mode_sizes_to_demand_over_target() -> None:
    scaler = Autoscaler(BASE)
    feed(scaler, 0, 60, 20)  # 20 / 7 -> 3
    decision = scaler.decide(60, ready=3, current=3)
    assert (decision.desired, decision.panic) == (3, False)
    assert decision.stable_demand == 20


def test_clamped_to_max_and_min_and_floor_without_scale_to_zero() -> None:
    scaler = Autoscaler(replace(BASE, max_replicas=2))
    feed(scaler, 0, 60, 100)
    assert scaler.decide(60, ready=2, current=2).desired == 2
    scaler = Autoscaler(replace(BASE, min_replicas=2))
    assert scaler.decide(0, ready=0, current=0).desired == 2
    scaler = Autoscaler(replace(BASE, scale_to_zero=False))
    assert scaler.decide(0, ready=0, current=0).desired == 1


def test_burst_enters_panic_and_follows_the_panic_window() -> None:
    scaler = Autoscaler(BASE)
    feed(scaler, 0, 52, 7)  # one replica, exactly at target
    assert scaler.decide(52, ready=1, current=1).panic is False
    feed(scaler, 54, 60, 35)  # 5x target in the last 6 s (>= 2x ready capacity)
    decision = scaler.decide(60, ready=1, current=1)
    assert decision.panic is True
    assert decision.desired == 5  # ceil(35 / 7), while the stable mean alone wants 2
    assert 1 < decision.stable_demand < 35


def test_panic_never_scales_down_and_ends_after_a_calm_stable_window() -> None:
    scaler = Autoscaler(replace(BASE, scale_down_delay_s=0))
    feed(scaler, 0, 6, 70)
    assert scaler.decide(6, ready=1, current=1).desired == 10
    feed(scaler, 8, 40, 7)
    decision = scaler.decide(40, ready=10, current=10)
    assert decision.panic is True and decision.desired == 10  # calm, but still in panic
    feed(scaler, 42, 130, 7)
    decision = scaler.decide(130, ready=10, current=10)
    assert decision.panic is False
    assert decision.desired == 5  # halved at most per step (max_scale_down_rate 2)
    assert scaler.decide(132, ready=5, current=5).desired == 2
    assert scaler.decide(134, ready=2, current=2).desired == 1


def test_scale_down_waits_for_the_delay_then_reaches_zero() -> None:
    scaler = Autoscaler(replace(BASE, scale_down_delay_s=300))
    feed(scaler, 0, 10, 7)
    assert scaler.decide(10, ready=1, current=1).desired == 1
    # Traffic stops at 12 s. The stable window still holds demand until 70 s; from then on
    # nothing wants the replica, but the delay keeps it 300 s more.
    for t in range(12, 372, 2):
        scaler.observe(t, 0)
        assert scaler.decide(t, ready=1, current=1).desired == 1, t
    scaler.observe(372, 0)
    assert scaler.decide(372, ready=1, current=1).desired == 0


def test_an_immediate_wish_counts_for_the_scale_down_delay() -> None:
    scaler = Autoscaler(replace(BASE, scale_down_delay_s=100))
    scaler.want(0, 3)  # e.g. a burst beyond the hard caps placed 3 at once
    scaler.observe(2, 1)
    assert scaler.decide(2, ready=3, current=3).desired == 3
    scaler.observe(120, 0)
    assert scaler.decide(120, ready=3, current=3).desired == 1  # rate-limited: 3 -> 1


def test_requests_shorter_than_a_tick_still_count_as_demand() -> None:
    async def main() -> None:
        now = [0.0]
        pool = ModelPool(BASE, Balancer(), RouterMetrics(), clock=lambda: now[0])
        replica = RoutedReplica("r1", "m", "agent", "http://127.0.0.1:1", "m", cap=4)
        replica.state = READY
        pool.replicas[replica.id] = replica
        now[0] = 1.0
        taken, waiter = await pool.acquire([], deadline=10.0)
        assert (taken, waiter, pool.demand()) == (replica, None, 1)
        now[0] = 1.1
        pool.release(taken)
        now[0] = 2.0
        mean = pool.demand_average()  # 0.1 s of one request over a 2 s tick
        assert mean == pytest.approx(0.05)
        pool.autoscaler.observe(now[0], mean)
        assert pool.autoscaler.decide(now[0], ready=1, current=1).desired == 1
        now[0] = 4.0
        assert pool.demand_average() == 0.0

    asyncio.run(main())
