"""Buffer sizing: how many healthy idle hosts of each type to keep, as a linear program (GLOP).

The model (docs/buffer.md has the long version):

- A host taken from the buffer is replaced at once; the replacement is ready one *replacement lead
  time* L_h later (the provider delivers the host and its boot health check passes). So the buffer
  of type h must absorb the scale-ups N_h that arrive during one lead time. N_h is a (compound)
  Poisson count with mean sum_m rate_m * L_h * hosts_m over the models m mapped to h.
- Decision variables: b_h >= 0 idle hosts kept, s_h >= 0 expected scale-ups per lead-time window
  that find the buffer empty. s_h is the epigraph of g_h(b) = E[(N_h - b)^+], which is convex and
  piecewise linear between integers, so it is exact as a few linear rows:
  s_h >= g_h(k) - P(N_h > k) * (b_h - k) for integer k.
- Objective, in money per hour: sum_h price_h * b_h + miss_cost_h * s_h. By Little's law s_h is also
  the mean number of scale-ups waiting for a fresh host (misses per hour = s_h * 3600 / L_h, each
  waits L_h longer than a hit), so miss_cost_h is what one waiting scale-up costs per hour.
- Constraints: min_h <= b_h <= supply_h; optional shared pools sum_{h in pool} b_h <= limit and a
  budget sum_h price_h * b_h <= budget.

Without shared rows the LP splits per type into a convex piecewise linear function with integer
breakpoints over an integer interval, so its optimum (a vertex) is integral: the newsvendor answer,
the smallest b with miss_cost * P(N > b) <= price. Shared rows can make a vertex fractional; those
values are rounded up where every limit still holds and down otherwise.

Replica boot time does not move the optimum: it adds the same time to a hit and a miss. It enters
the reported expected time to a ready replica (boot + share of misses * lead time).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from fastboot.errors import DependencyError, UsageError

log = logging.getLogger(__name__)

#: Default cost of one scale-up waiting an hour for a fresh host, as a multiple of its host's
#: hourly price when the caller gives none: waiting users are worth more than an idle GPU.
DEFAULT_MISS_COST_FACTOR = 10.0

#: Probability mass left out at each end of the demand distribution when drawing its breakpoints.
TAIL = 1e-9

#: Most breakpoint rows per host type; wider distributions use an integer stride (rarely needed:
#: a mean of 10,000 scale-ups per lead time spans about 1,300 integers).
MAX_ROWS = 2000


class PlanStatus(enum.Enum):
    """How a solve ended."""

    OPTIMAL = "optimal"
    INFEASIBLE = "infeasible"
    ERROR = "error"


@dataclass(frozen=True)
class HostType:
    """One kind of host the provider can hand over, with what it costs and how fast it comes."""

    name: str  #: host type name, e.g. "h100-80g" or "cpu-16"
    price_per_hour: float  #: money one idle host of this type costs per hour
    lead_time_s: float  #: replacement lead time: provider delivers the host + boot check passes
    supply: int  #: most hosts of this type the provider can hand over now (observed)
    min_buffer: int = 0  #: floor on the buffer (spare hosts for failures), whatever the demand
    miss_cost_per_hour: float | None = None  #: cost/h of a scale-up waiting; None: factor x price

    def __post_init__(self) -> None:
        if self.price_per_hour < 0 or self.lead_time_s <= 0 or self.supply < 0:
            raise UsageError(
                f"host type {self.name!r}: price must be >= 0, lead time > 0 and supply >= 0 "
                f"(got {self.price_per_hour}, {self.lead_time_s}, {self.supply})"
            )
        if self.min_buffer < 0:
            raise UsageError(f"host type {self.name!r}: min_buffer must be >= 0")

    @property
    def miss_cost(self) -> float:
        """Cost per hour of one scale-up waiting for a fresh host of this type."""
        if self.miss_cost_per_hour is not None:
            return self.miss_cost_per_hour
        return DEFAULT_MISS_COST_FACTOR * self.price_per_hour


@dataclass(frozen=True)
class ModelDemand:
    """The demand forecast of one model: how often it scales up, and on what hosts."""

    model: str  #: model name as the router serves it
    host_type: str  #: the host type its replicas run on
    scaleups_per_s: float  #: forecast arrival rate of scale-ups (replicas started per second)
    hosts_per_scaleup: int = (
        1  #: hosts one replica takes (e.g. 2 for a TP=2 replica of 1-GPU hosts)
    )
    boot_s: float = 0.0  #: replica boot time on a ready host (snapshot restore or cold boot)

    def __post_init__(self) -> None:
        if self.scaleups_per_s < 0 or self.hosts_per_scaleup < 1 or self.boot_s < 0:
            raise UsageError(
                f"model {self.model!r}: rate and boot time must be >= 0 and hosts_per_scaleup >= 1"
            )


@dataclass(frozen=True)
class SupplyPool:
    """A limit shared by several host types (a region quota, one cloud account's GPUs)."""

    name: str  #: pool name, for messages
    host_types: tuple[str, ...]  #: the host types that draw on this pool
    limit: int  #: most buffer hosts the pool can hold, all its types together


@dataclass(frozen=True)
class BufferProblem:
    """Everything one solve needs."""

    host_types: tuple[HostType, ...]  #: the host types to size a buffer for
    demands: tuple[ModelDemand, ...]  #: the demand forecast, per model
    pools: tuple[SupplyPool, ...] = ()  #: limits shared across host types
    budget_per_hour: float | None = None  #: most the whole buffer may cost per hour; None: no cap

    def __post_init__(self) -> None:
        names = [h.name for h in self.host_types]
        if len(set(names)) != len(names):
            raise UsageError(f"host types must have distinct names (got {names})")
        known = set(names)
        for demand in self.demands:
            if demand.host_type not in known:
                raise UsageError(
                    f"model {demand.model!r} runs on unknown host type {demand.host_type!r}; "
                    f"known: {sorted(known)}"
                )
        for pool in self.pools:
            if unknown := set(pool.host_types) - known:
                raise UsageError(f"pool {pool.name!r} names unknown host types {sorted(unknown)}")


@dataclass(frozen=True)
class TypePlan:
    """The answer for one host type."""

    host_type: str  #: host type name
    target: int  #: idle hosts to keep (the LP value, rounded)
    lp_value: float  #: the LP's (possibly fractional) buffer size before rounding
    mean_demand: float  #: expected hosts asked for during one replacement lead time
    expected_misses: float  #: expected scale-ups per lead time that find the buffer empty
    expected_ready_s: float  #: mean time from scale-up to ready replica: boot + misses * lead time
    cost_per_hour: float  #: idle cost of the target buffer per hour


@dataclass(frozen=True)
class BufferPlan:
    """What a solve returned. Infeasible or failed solves say why in `message`; never raised."""

    status: PlanStatus  #: optimal, infeasible (limits contradict each other) or error
    types: Mapping[str, TypePlan]  #: per host type (empty unless optimal)
    objective_per_hour: float  #: LP objective: idle cost + miss cost per hour (nan unless optimal)
    solve_s: float  #: wall time of building and solving the LP, seconds
    message: str = ""  #: why it is infeasible or failed; empty when optimal
    rows: int = 0  #: LP constraints built (breakpoint rows + limits)

    @property
    def targets(self) -> dict[str, int]:
        """Idle hosts to keep per host type (empty unless optimal)."""
        return {name: plan.target for name, plan in self.types.items()}

    @property
    def ok(self) -> bool:
        """True when the plan can be applied."""
        return self.status is PlanStatus.OPTIMAL


@dataclass(frozen=True)
class _Demand:
    """Breakpoints of g(b) = E[(N - b)^+] for one host type's demand N."""

    mean: float  #: E[N]
    ks: tuple[int, ...]  #: integer breakpoints
    g: tuple[float, ...]  #: g(k) at each breakpoint
    tail: tuple[float, ...]  #: P(N > k) at each breakpoint (minus the slope of g to the right)


def poisson_pmf(mean: float, tail: float = TAIL) -> npt.NDArray[np.float64]:
    """pmf of Poisson(mean) on 0..K, K the first point past which less than `tail` mass is left."""
    if mean <= 0:
        return np.ones(1)
    hi = int(mean + 12.0 * math.sqrt(mean) + 20)
    k = np.arange(hi + 1, dtype=np.float64)
    lgamma = np.array([math.lgamma(x + 1.0) for x in k])
    pmf = np.exp(k * math.log(mean) - mean - lgamma)
    cdf = np.cumsum(pmf)
    cut = int(np.searchsorted(cdf, 1.0 - tail)) + 1
    return np.asarray(pmf[: min(cut + 1, hi + 1)], dtype=np.float64)


def _type_demand(
    host: HostType, demands: list[ModelDemand], upto: int, max_rows: int = MAX_ROWS
) -> _Demand:
    pmf: npt.NDArray[np.float64] = np.ones(1)
    for demand in demands:
        base = poisson_pmf(demand.scaleups_per_s * host.lead_time_s)
        if demand.hosts_per_scaleup > 1:
            spread = np.zeros((len(base) - 1) * demand.hosts_per_scaleup + 1)
            spread[:: demand.hosts_per_scaleup] = base
            base = spread
        pmf = np.asarray(np.convolve(pmf, base), dtype=np.float64)
    mean = float(np.dot(np.arange(len(pmf)), pmf))
    survival = 1.0 - np.cumsum(pmf)  # P(N > k)
    survival[survival < 0] = 0.0
    if mean <= 0:
        return _Demand(0.0, (), (), ())
    # g(k+1) = g(k) - P(N > k); rows where P(N > k) ~ 1 all coincide with s >= E[N] - b, which is
    # always added, and rows past the top of the support or the supply add nothing.
    lo = int(np.searchsorted(-survival, -(1.0 - TAIL)))
    top = min(len(pmf) - 1, upto)
    stride = max(1, math.ceil((top - lo + 1) / max_rows))
    g = mean - np.concatenate(([0.0], np.cumsum(survival)))[: len(pmf)]
    ks = list(range(lo, top + 1, stride))
    if ks and ks[-1] != top:
        ks.append(top)
    return _Demand(
        mean=mean,
        ks=tuple(ks),
        g=tuple(float(max(g[k], 0.0)) for k in ks),
        tail=tuple(float(survival[k]) for k in ks),
    )


def _g_at(demand: _Demand, b: float) -> float:
    """E[(N - b)^+] as the LP sees it: the max of its rows (exact at integers)."""
    best = max(demand.mean - b, 0.0)
    for k, g, tail in zip(demand.ks, demand.g, demand.tail, strict=True):
        best = max(best, g - tail * (b - k))
    return best


def _diagnose(problem: BufferProblem) -> str:
    """Name the limits that contradict each other, for the infeasible message."""
    reasons = [
        f"{h.name}: min_buffer {h.min_buffer} > supply {h.supply}"
        for h in problem.host_types
        if h.min_buffer > h.supply
    ]
    by_name = {h.name: h for h in problem.host_types}
    for pool in problem.pools:
        floor = sum(by_name[name].min_buffer for name in pool.host_types)
        if floor > pool.limit:
            reasons.append(f"pool {pool.name}: min_buffers sum to {floor} > limit {pool.limit}")
    if problem.budget_per_hour is not None:
        floor_cost = sum(h.min_buffer * h.price_per_hour for h in problem.host_types)
        if floor_cost > problem.budget_per_hour:
            reasons.append(
                f"budget {problem.budget_per_hour:g}/h < {floor_cost:g}/h that min_buffers cost"
            )
    return "; ".join(reasons) or "the limits contradict each other"


def solve(problem: BufferProblem) -> BufferPlan:
    """Size the buffer of every host type. Returns an infeasible/error plan instead of raising."""
    try:
        from ortools.linear_solver import pywraplp
    except ImportError as exc:  # pragma: no cover - ortools is a declared extra
        raise DependencyError(
            "buffer sizing needs OR-Tools: pip install 'fastboot[router]'"
        ) from exc

    start = time.perf_counter()
    solver = pywraplp.Solver.CreateSolver("GLOP")
    if solver is None:  # pragma: no cover - GLOP ships in every ortools wheel
        return BufferPlan(PlanStatus.ERROR, {}, math.nan, time.perf_counter() - start, "no GLOP")
    inf = solver.infinity()
    by_type: dict[str, list[ModelDemand]] = {h.name: [] for h in problem.host_types}
    for demand in problem.demands:
        by_type[demand.host_type].append(demand)

    buffers: dict[str, pywraplp.Variable] = {}
    shortfalls: dict[str, pywraplp.Variable] = {}
    curves: dict[str, _Demand] = {}
    objective = solver.Objective()
    rows = 0
    for host in problem.host_types:
        curve = _type_demand(host, by_type[host.name], upto=host.supply)
        curves[host.name] = curve
        b = solver.NumVar(0.0, inf, f"buffer[{host.name}]")
        s = solver.NumVar(0.0, inf, f"shortfall[{host.name}]")
        buffers[host.name], shortfalls[host.name] = b, s
        # Supply and floor as rows, not bounds: GLOP then reports a contradiction as INFEASIBLE.
        solver.Add(b <= host.supply, f"supply[{host.name}]")
        solver.Add(b >= host.min_buffer, f"floor[{host.name}]")
        solver.Add(s + b >= curve.mean, f"mean[{host.name}]")
        rows += 3
        for k, g, tail in zip(curve.ks, curve.g, curve.tail, strict=True):
            solver.Add(s + tail * b >= g + tail * k, f"g[{host.name},{k}]")
            rows += 1
        objective.SetCoefficient(b, host.price_per_hour)
        objective.SetCoefficient(s, host.miss_cost)
    for pool in problem.pools:
        solver.Add(sum(buffers[name] for name in pool.host_types) <= pool.limit, pool.name)
        rows += 1
    if problem.budget_per_hour is not None:
        solver.Add(
            sum(h.price_per_hour * buffers[h.name] for h in problem.host_types)
            <= problem.budget_per_hour,
            "budget",
        )
        rows += 1
    objective.SetMinimization()
    status = solver.Solve()
    elapsed = time.perf_counter() - start

    if status == pywraplp.Solver.INFEASIBLE:
        message = f"no buffer satisfies every limit: {_diagnose(problem)}"
        log.warning("buffer LP infeasible in %.1f ms: %s", elapsed * 1e3, message)
        return BufferPlan(PlanStatus.INFEASIBLE, {}, math.nan, elapsed, message, rows)
    if status != pywraplp.Solver.OPTIMAL:
        message = f"GLOP stopped with status {status} (not optimal); keep the previous targets"
        log.warning("buffer LP failed in %.1f ms: %s", elapsed * 1e3, message)
        return BufferPlan(PlanStatus.ERROR, {}, math.nan, elapsed, message, rows)

    values = {name: var.solution_value() for name, var in buffers.items()}
    targets = _round(problem, values, curves)
    types: dict[str, TypePlan] = {}
    for host in problem.host_types:
        curve = curves[host.name]
        target = targets[host.name]
        misses = _g_at(curve, target)
        share = misses / curve.mean if curve.mean > 0 else 0.0
        demands = by_type[host.name]
        rate = sum(d.scaleups_per_s for d in demands)
        boot = sum(d.boot_s * d.scaleups_per_s for d in demands) / rate if rate > 0 else 0.0
        types[host.name] = TypePlan(
            host_type=host.name,
            target=target,
            lp_value=values[host.name],
            mean_demand=curve.mean,
            expected_misses=misses,
            expected_ready_s=boot + share * host.lead_time_s,
            cost_per_hour=target * host.price_per_hour,
        )
    plan = BufferPlan(PlanStatus.OPTIMAL, types, objective.Value(), elapsed, "", rows)
    log.debug("buffer LP solved in %.2f ms: %s", elapsed * 1e3, plan.targets)
    return plan


def _round(
    problem: BufferProblem, values: Mapping[str, float], curves: Mapping[str, _Demand]
) -> dict[str, int]:
    """Integral targets: floor, then round up each fractional value (most valuable first) where
    supply, pools and budget all still hold."""
    eps = 1e-6
    targets = {name: math.floor(value + eps) for name, value in values.items()}
    by_name = {h.name: h for h in problem.host_types}

    def fits(name: str) -> bool:
        trial = dict(targets, **{name: targets[name] + 1})
        if trial[name] > by_name[name].supply:
            return False
        for pool in problem.pools:
            if sum(trial[n] for n in pool.host_types) > pool.limit:
                return False
        if problem.budget_per_hour is not None:
            cost = sum(trial[n] * h.price_per_hour for n, h in by_name.items())
            if cost > problem.budget_per_hour + eps:
                return False
        return True

    def gain(name: str) -> float:
        host, curve = by_name[name], curves[name]
        base = targets[name]
        saved = _g_at(curve, base) - _g_at(curve, base + 1)
        return host.miss_cost * saved - host.price_per_hour

    fractional = [name for name, value in values.items() if value - targets[name] > eps]
    for name in sorted(fractional, key=gain, reverse=True):
        if fits(name):
            targets[name] += 1
    return targets


# --- re-solving on a period and on events -----------------------------------------------------


@dataclass
class ScaleUpForecaster:
    """Recent scale-up arrival rates per model, from the scale-ups the router reports.

    The forecast is the larger of the rate over a short and a long window, so a burst is seen
    within `short_window_s` and a quiet minute does not erase the last ten.
    """

    short_window_s: float = 60.0  #: window that reacts to bursts
    long_window_s: float = 600.0  #: window that remembers the recent level
    _events: dict[str, deque[tuple[float, int]]] = field(default_factory=dict)

    def record(self, model: str, now: float, count: int = 1) -> None:
        """Note `count` scale-ups of `model` at time `now` (seconds, any monotonic clock)."""
        self._events.setdefault(model, deque()).append((now, count))

    def rates(self, now: float) -> dict[str, float]:
        """Forecast scale-ups per second, per model seen within the long window."""
        out: dict[str, float] = {}
        for model, events in self._events.items():
            while events and events[0][0] < now - self.long_window_s:
                events.popleft()
            short = sum(c for t, c in events if t >= now - self.short_window_s)
            total = sum(c for _, c in events)
            out[model] = max(short / self.short_window_s, total / self.long_window_s)
        return out


class BufferSizer:
    """Re-solves the buffer LP from the live forecast: on a period, and soon after `trigger()`.

    The router calls `record_scaleup(model)` for every replica it starts, `trigger()` on events
    that change the picture (a host quarantined, the buffer found empty, supply changed), and runs
    `run(apply)` as a task; `apply` receives every optimal plan (e.g. `BufferManager.set_targets`
    of `plan.targets`). Infeasible or failed solves are logged and the previous targets kept.
    """

    def __init__(
        self,
        host_types: tuple[HostType, ...],
        models: Mapping[str, str],
        *,
        hosts_per_scaleup: Mapping[str, int] | None = None,
        boot_s: Mapping[str, float] | None = None,
        pools: tuple[SupplyPool, ...] = (),
        budget_per_hour: float | None = None,
        forecaster: ScaleUpForecaster | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host_types = {h.name: h for h in host_types}
        self.models = dict(models)
        self.hosts_per_scaleup = dict(hosts_per_scaleup or {})
        self.boot_s = dict(boot_s or {})
        self.pools = pools
        self.budget_per_hour = budget_per_hour
        self.forecaster = forecaster or ScaleUpForecaster()
        self.clock = clock
        self.last_plan: BufferPlan | None = None
        self.solves = 0
        self._wake = asyncio.Event()

    def record_scaleup(self, model: str, count: int = 1) -> None:
        """Note that `model` started `count` replicas now."""
        self.forecaster.record(model, self.clock(), count)

    def update_host_type(self, name: str, **changes: float | int | None) -> None:
        """Change what is known about a host type (observed supply, price, lead time); re-solve."""
        self.host_types[name] = replace(self.host_types[name], **changes)  # type: ignore[arg-type]
        self.trigger()

    def trigger(self) -> None:
        """Ask for a re-solve as soon as the run loop can."""
        self._wake.set()

    def problem(self) -> BufferProblem:
        """The LP for the current forecast."""
        rates = self.forecaster.rates(self.clock())
        demands = tuple(
            ModelDemand(
                model=model,
                host_type=host_type,
                scaleups_per_s=rates.get(model, 0.0),
                hosts_per_scaleup=self.hosts_per_scaleup.get(model, 1),
                boot_s=self.boot_s.get(model, 0.0),
            )
            for model, host_type in self.models.items()
        )
        return BufferProblem(
            tuple(self.host_types.values()), demands, self.pools, self.budget_per_hour
        )

    def solve(self) -> BufferPlan:
        """Solve now; the plan is also kept as `last_plan`."""
        plan = solve(self.problem())
        self.solves += 1
        self.last_plan = plan
        return plan

    async def run(self, apply: Callable[[BufferPlan], None], period_s: float = 30.0) -> None:
        """Solve every `period_s` and after each trigger; hand optimal plans to `apply`. Runs until
        cancelled."""
        while True:
            plan = self.solve()
            if plan.ok:
                log.info(
                    "buffer targets %s (LP solved in %.1f ms)", plan.targets, plan.solve_s * 1e3
                )
                apply(plan)
            else:
                log.warning("buffer LP %s: %s", plan.status.value, plan.message)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(period_s):
                    await self._wake.wait()
            self._wake.clear()
