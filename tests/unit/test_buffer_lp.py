"""The buffer LP on cases solved by hand (Poisson tail sums written out below)."""

from __future__ import annotations

import asyncio
import math

import pytest

from fastboot.buffer.lp import (
    BufferPlan,
    BufferProblem,
    BufferSizer,
    HostType,
    ModelDemand,
    PlanStatus,
    ScaleUpForecaster,
    SupplyPool,
    poisson_pmf,
    solve,
)
from fastboot.errors import UsageError

# Poisson(2): P(N > k) for k = 0..4, and g(k) = E[(N - k)^+] = 2 - sum_{j<k} P(N > j).
E2 = math.exp(-2.0)
TAIL2 = [1 - E2, 1 - 3 * E2, 1 - 5 * E2, 1 - (1 + 2 + 2 + 4 / 3) * E2, 1 - 7 * E2]
G2 = [2.0 - sum(TAIL2[:k]) for k in range(5)]


def one_type(
    rate: float = 0.02,
    *,
    price: float = 1.0,
    miss: float = 5.0,
    supply: int = 10,
    min_buffer: int = 0,
    lead: float = 100.0,
    hosts: int = 1,
) -> BufferProblem:
    host = HostType("gpu", price, lead, supply, min_buffer, miss_cost_per_hour=miss)
    return BufferProblem((host,), (ModelDemand("m", "gpu", rate, hosts, boot_s=4.0),))


def test_newsvendor_case_by_hand() -> None:
    # rate 0.02/s x lead 100 s = Poisson(2). Keep adding while 5 * P(N > b) > 1, i.e. P > 0.2:
    # P(N>0)=.865, P(N>1)=.594, P(N>2)=.323 -> add; P(N>3)=.143 -> stop at b = 3.
    plan = solve(one_type())
    assert plan.status is PlanStatus.OPTIMAL and plan.ok
    assert plan.targets == {"gpu": 3}
    t = plan.types["gpu"]
    assert t.lp_value == pytest.approx(3.0, abs=1e-6)
    assert t.mean_demand == pytest.approx(2.0, abs=1e-6)
    assert t.expected_misses == pytest.approx(G2[3], abs=1e-6)
    assert plan.objective_per_hour == pytest.approx(3 * 1.0 + 5.0 * G2[3], abs=1e-6)
    # boot 4 s, plus the share of scale-ups that miss times the 100 s lead time
    assert t.expected_ready_s == pytest.approx(4.0 + G2[3] / 2.0 * 100.0, abs=1e-4)
    assert 0.0 < plan.solve_s < 1.0


def test_zero_demand_gives_zero_buffer_but_keeps_the_floor() -> None:
    assert solve(one_type(rate=0.0)).targets == {"gpu": 0}
    plan = solve(one_type(rate=0.0, min_buffer=2))
    assert plan.targets == {"gpu": 2}
    assert plan.types["gpu"].expected_misses == 0.0


def test_miss_cost_below_idle_cost_gives_no_buffer() -> None:
    # Even the first host saves at most 0.9 * P(N > 0) < 1 per hour: never worth it.
    plan = solve(one_type(rate=1.0, price=1.0, miss=0.9))
    assert plan.targets == {"gpu": 0}
    assert plan.types["gpu"].expected_misses == pytest.approx(100.0, rel=1e-6)


def test_supply_cap_binds() -> None:
    plan = solve(one_type(miss=100.0, supply=2))
    assert plan.targets == {"gpu": 2}
    assert plan.types["gpu"].expected_misses == pytest.approx(G2[2], abs=1e-6)


def test_multi_host_scaleups_compound_demand() -> None:
    # N = 2 * Poisson(1): P(N>0)=P(N>1)=1-e^-1=.632, P(N>2)=P(N>3)=.264, P(N>4)=.080 -> 4 hosts.
    plan = solve(one_type(rate=0.01, hosts=2))
    assert plan.targets == {"gpu": 4}
    assert plan.types["gpu"].mean_demand == pytest.approx(2.0, abs=1e-6)


@pytest.mark.parametrize(
    ("problem", "says"),
    [
        (one_type(min_buffer=11, supply=10), "gpu: min_buffer 11 > supply 10"),
        (
            BufferProblem(
                (HostType("a", 1, 60, 5, min_buffer=3), HostType("b", 1, 60, 5, min_buffer=3)),
                (),
                pools=(SupplyPool("region", ("a", "b"), 4),),
            ),
            "pool region: min_buffers sum to 6 > limit 4",
        ),
        (
            BufferProblem((HostType("a", 2.0, 60, 5, min_buffer=2),), (), budget_per_hour=3.0),
            "budget 3/h < 4/h",
        ),
    ],
)
def test_infeasible_supply_is_a_result_not_a_crash(problem: BufferProblem, says: str) -> None:
    plan = solve(problem)
    assert plan.status is PlanStatus.INFEASIBLE and not plan.ok
    assert plan.targets == {}
    assert says in plan.message
    assert math.isnan(plan.objective_per_hour)


def test_shared_pool_goes_to_the_costlier_misses() -> None:
    # Both Poisson(2), price 1. Marginal savings 5*P(N>k) for a: 4.32, 2.97, 1.62, 0.71;
    # 20*P(N>k) for b: 17.3, 11.9, 6.47, 2.86. A pool of 4 takes the 4 largest: b0 b1 b2 a0.
    a = HostType("a", 1.0, 100.0, 10, miss_cost_per_hour=5.0)
    b = HostType("b", 1.0, 100.0, 10, miss_cost_per_hour=20.0)
    demand = (ModelDemand("ma", "a", 0.02), ModelDemand("mb", "b", 0.02))
    free = solve(BufferProblem((a, b), demand))
    assert free.targets == {"a": 3, "b": 5}
    pooled = solve(BufferProblem((a, b), demand, pools=(SupplyPool("quota", ("a", "b"), 4),)))
    assert pooled.targets == {"a": 1, "b": 3}


def test_fractional_budget_rounds_down_where_rounding_up_breaks_it() -> None:
    plan = solve(BufferProblem(one_type().host_types, one_type().demands, budget_per_hour=2.5))
    assert plan.types["gpu"].lp_value == pytest.approx(2.5, abs=1e-6)
    assert plan.targets == {"gpu": 2}
    roomy = solve(BufferProblem(one_type().host_types, one_type().demands, budget_per_hour=2.5 + 1))
    assert roomy.targets == {"gpu": 3}


def test_large_burst_solves_fast_and_sits_above_the_mean() -> None:
    # 40 scale-ups/s over a 200 s lead time: mean 8000; 10x miss cost -> the 90th percentile.
    host = HostType("gpu", 1.0, 200.0, 100_000, miss_cost_per_hour=10.0)
    plan = solve(BufferProblem((host,), (ModelDemand("docs", "gpu", 40.0),)))
    target = plan.targets["gpu"]
    assert 8000 + 1.0 * math.sqrt(8000) < target < 8000 + 1.6 * math.sqrt(8000)  # z(0.9) = 1.28
    assert plan.solve_s < 0.5


def test_poisson_pmf_sums_to_one() -> None:
    for mean in (0.0, 0.3, 7.0, 5000.0):
        pmf = poisson_pmf(mean)
        assert float(pmf.sum()) == pytest.approx(1.0, abs=1e-8)


def test_bad_inputs_are_usage_errors() -> None:
    host = HostType("gpu", 1.0, 60.0, 4)
    with pytest.raises(UsageError, match="unknown host type 'tpu'"):
        BufferProblem((host,), (ModelDemand("m", "tpu", 0.1),))
    with pytest.raises(UsageError, match="lead time"):
        HostType("gpu", 1.0, 0.0, 4)
    with pytest.raises(UsageError, match="distinct"):
        BufferProblem((host, host), ())


def test_forecaster_sees_a_burst_and_remembers_the_level() -> None:
    f = ScaleUpForecaster(short_window_s=60.0, long_window_s=600.0)
    for t in range(0, 600, 60):
        f.record("chat", float(t))  # one per minute for ten minutes
    assert f.rates(599.0)["chat"] == pytest.approx(10 / 600)
    f.record("chat", 599.5, count=30)  # burst
    assert f.rates(600.0)["chat"] == pytest.approx(31 / 60)  # short window wins
    assert f.rates(2000.0)["chat"] == 0.0  # everything aged out


def test_sizer_resolves_on_period_and_on_trigger() -> None:
    now = [0.0]
    host = HostType("gpu", 1.0, 100.0, 10, miss_cost_per_hour=5.0)
    sizer = BufferSizer((host,), {"m": "gpu"}, clock=lambda: now[0])
    applied: list[BufferPlan] = []

    async def scenario() -> None:
        task = asyncio.create_task(sizer.run(applied.append, period_s=3600.0))
        await asyncio.sleep(0.05)
        assert [p.targets for p in applied] == [{"gpu": 0}]  # no scale-ups seen yet
        for _ in range(12):  # 12 in the long window of 600 s -> 0.02/s -> Poisson(2) per lead
            sizer.record_scaleup("m")
        now[0] = 100.0
        sizer.trigger()
        await asyncio.sleep(0.05)
        sizer.update_host_type("gpu", supply=1)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert [p.targets["gpu"] for p in applied] == [0, 3, 1]
    assert sizer.solves == 3
