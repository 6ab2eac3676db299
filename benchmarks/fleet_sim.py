"""Discrete-event simulation of a GPU fleet under bursty demand: does the buffer pay for itself?

Compares, on the same request trace (seeded):
  1. no buffer + cold boot          every scale-up waits for a new host, then a cold vLLM boot
  2. buffer + cold boot             scale-ups take a healthy idle host, then boot cold
  3. buffer + lazy image + restore  scale-ups take a healthy idle host and restore a snapshot
with fixed buffer sizes (0, 2, 8, 32, 128) and the LP-sized buffer (fastboot.buffer.lp, re-solved
every 30 s from the live scale-up forecast, exactly as the router would). It reports GPU allocation
utilization, p50/p99 request-to-first-token, and cost in GPU-hours.

Boot phases come from results measured here (boot_latency.json: cold `vllm serve` and snapshot
restore, CPU vLLM; imagefs.json: lazy-image mount and the cold fetch of the runtime's files;
replicas.json and imagefs_snapshot.json, once they exist: K replicas restored at once, and a
restore from the snapshot's image, cold, each run as a sensitivity row) and, for the phases a
CPU machine cannot measure (host allocation, GPU health check, weight download, CUDA init/graphs,
GPU memory restore), from public figures cited in /work/shared/reference/*.md. Every phase is
printed with its source and its label: measured / cited / derived / placeholder.

Model (simplifications stated): one host = one GPU = one replica of an 8B-class model; requests
are simulated in 1-second arrival cohorts (split as slots free up), pooled per model (the router's
least-loaded routing is approximated by one pool of slots); hosts are billed from the moment they
are requested until they are released.

    python benchmarks/fleet_sim.py [--seed 7] [--hours 3] [--no-plot] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastboot.buffer.lp import BufferSizer, HostType, ScaleUpForecaster  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
REFS = "/work/shared/reference"


# --- boot phases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """One boot phase: its duration, and where the number comes from."""

    seconds: float  #: duration used by the simulation
    label: str  #: measured | cited | derived | placeholder
    source: str  #: file, run, or public source


def load_phases() -> dict[str, Phase]:
    """Boot phases: measured here where possible, cited public figures for GPU-only phases."""
    boot = json.loads((RESULTS / "boot_latency.json").read_text())
    big = next(r for r in boot["results"] if r["size"] == "1gib")
    ph: dict[str, Phase] = {
        "host_allocation": Phase(
            150.0,
            "cited",
            "Modal 'Keeping 20,000 GPUs healthy': cloud A boots in 2-3 min "
            f"({REFS}/router-anchors.md §1.2)",
        ),
        "boot_health_check": Phase(
            60.0,
            "cited",
            f"Modal: dcgmi diag -r 1 takes 'at least a minute' ({REFS}/cold-start-anchors.md §7.2)",
        ),
        "full_image_pull": Phase(
            (8 * 2**30 + 16.4e9) / 0.8e9,
            "derived",
            "8 GiB env (Modal's 'fat' container) + 16.4 GB Qwen3-8B weights (Dynamo table) at "
            f"0.8 GB/s (Modal's pre-ImageFS throughput) ({REFS}/lazy-image-anchors.md §4, "
            "cold-start-anchors.md §7)",
        ),
        "engine_cold_start": Phase(
            float(big["vllm_serve_median_s"]),
            "measured",
            "boot_latency.json: vllm serve of a 1 GiB model to first completion, CPU, "
            "median of 3 (stands in for imports, engine init and compile)",
        ),
        "cuda_init_and_graphs": Phase(
            17.0 + 0.69,
            "cited",
            "vLLM #20264: CUDA graph capture 17 s, weights to GPU 0.69 s "
            f"({REFS}/cold-start-anchors.md §4)",
        ),
    }
    ph.update(lazy_image_phases(RESULTS / "imagefs.json"))
    ph["snapshot_restore"] = Phase(
        float(big["fastboot_restore_median_s"]),
        "measured",
        "boot_latency.json: fastboot restore of the 1 GiB model to first completion, CPU, median",
    )
    ph["gpu_memory_restore"] = Phase(
        8.1 * (1 - 0.58),
        "derived",
        "Dynamo Snapshot: Qwen3-8B restore 8.1 s end to end, CRIU stage 49-67% of it, so the "
        f"GPU part is ~42% ({REFS}/cold-start-anchors.md §7)",
    )
    if contended := parallel_restore_phase(RESULTS / "replicas.json", ph["snapshot_restore"]):
        ph["snapshot_restore_k"] = contended
    if from_image := snapshot_image_phase(RESULTS / "imagefs_snapshot.json"):
        ph["snapshot_from_image"] = from_image
    return ph


def snapshot_image_phase(path: Path) -> Phase | None:
    """What a host without the snapshot pays to restore it from its image, cold, over a warm
    local copy (benchmarks/imagefs_bench.py --snapshot; None until that result exists)."""
    if not path.exists():
        return None
    snap = json.loads(path.read_text())["snapshot"]
    cold, warm = snap["mount_cold"], snap["local_warm"]
    return Phase(
        float(cold["restore_s"]) - float(warm["restore_s"]),
        "measured",
        f"{path.name}: tiny-model snapshot ({snap['snapshot_bytes'] / 1e9:.2f} GB) restored from "
        f"its image mounted cold {cold['restore_s']:.2f} s (verify {cold['verify_s']:.2f} s) "
        f"minus from a warm local copy {warm['restore_s']:.2f} s",
    )


def lazy_image_phases(path: Path) -> dict[str, Phase]:
    """The lazy image's share of a restore, from benchmarks/imagefs_bench.py's results.

    Mount: the image's index loaded and the mount answering. Fetch: what a cold remote adds to
    the runtime's files that a restored process maps (CRIU reopens every file mapping), measured
    as cold `import torch` from the lazy image minus `import torch` from local disk.
    """
    if not path.exists():
        reason = f"no {path.name} yet"
        return {
            "lazy_image_mount": Phase(
                0.1,
                "placeholder",
                f"{reason}: the < 100 ms index-load target ({REFS}/lazy-image-anchors.md §10)",
            ),
            "lazy_image_fetch": Phase(0.0, "placeholder", f"{reason}: assumed free"),
        }
    doc = json.loads(path.read_text())
    index, torch = doc["index"], doc["torch"]
    image_mb, fetched_mb = torch["image_bytes"] / 1e6, torch["fetched_bytes"] / 1e6
    return {
        "lazy_image_mount": Phase(
            float(index["mount_to_ready_s"]),
            "measured",
            f"{path.name}: mount of a {index['files']:,}-file image until it answers (index "
            f"load {index['index_load_ms']:.1f} ms), this machine",
        ),
        "lazy_image_fetch": Phase(
            float(torch["cold_s"]) - float(torch["local_s"]),
            "measured",
            f"{path.name}: cold `import torch` from the lazy image {torch['cold_s']:.2f} s minus "
            f"local disk {torch['local_s']:.2f} s ({fetched_mb:.0f} MB fetched of a "
            f"{image_mb:.0f} MB image, loopback nginx remote): the runtime files a restore maps",
        ),
    }


def parallel_restore_phase(path: Path, single: Phase) -> Phase | None:
    """Snapshot restore when K replicas restore at once on one host, from
    benchmarks/replicas.py's results (None until they exist): the single restore scaled by the
    measured K-at-once / one-at-a-time ratio at the largest K."""
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    rows = doc["results"]
    one = next((r for r in rows if r["k"] == 1), None)
    top = max(rows, key=lambda r: r["k"])
    if one is None or top["k"] == 1:
        return None
    top_s, one_s = restore_median_s(top), restore_median_s(one)
    ratio = top_s / one_s
    cpus = doc.get("host", {}).get("cpus", "?")
    return Phase(
        single.seconds * ratio,
        "derived",
        f"{path.name}: {top['k']} tiny-model replicas restored at once took {ratio:.2f}x one "
        f"({top_s:.2f} s vs {one_s:.2f} s, {cpus} CPU cores "
        "shared: an upper bound for a GPU host), times the 1 GiB restore above",
    )


def restore_median_s(row: dict[str, Any]) -> float:
    """A replicas.json row's median restore: page images mapped (fastboot's default) where the
    run had the patched CRIU, else copied; older results have one flat value."""
    for mode in ("mapped", "copied"):
        if mode in row:
            return float(row[mode]["restore_median_s"])
    return float(row["restore_median_s"])


@dataclass(frozen=True)
class BootModel:
    """What a scale-up costs in time, per boot mode."""

    name: str  #: cold | restore
    median_s: float  #: median replica boot on a ready host
    lead_time_s: float  #: median wait for a new host (allocation + boot health check)


def boot_models(ph: dict[str, Phase]) -> dict[str, BootModel]:
    lead = ph["host_allocation"].seconds + ph["boot_health_check"].seconds
    cold = sum(
        ph[k].seconds for k in ("full_image_pull", "engine_cold_start", "cuda_init_and_graphs")
    )
    lazy = ("lazy_image_mount", "lazy_image_fetch", "gpu_memory_restore")
    restore = sum(ph[k].seconds for k in (*lazy, "snapshot_restore"))
    models = {
        "cold": BootModel("cold", cold, lead),
        "restore": BootModel("restore", restore, lead),
    }
    if "snapshot_restore_k" in ph:
        contended = sum(ph[k].seconds for k in (*lazy, "snapshot_restore_k"))
        models["restore-k"] = BootModel("restore-k", contended, lead)
    if "snapshot_from_image" in ph:
        models["restore-img"] = BootModel(
            "restore-img", restore + ph["snapshot_from_image"].seconds, lead
        )
    return models


# --- workload -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """Per-model, per-second request arrival counts (one shared trace for every run)."""

    models: tuple[str, ...]  #: model names
    arrivals: np.ndarray  #: [model, second] request counts
    rates: np.ndarray  #: [model, second] the rate the counts were drawn from
    description: dict[str, str] = field(default_factory=dict)  #: what each model's demand is


def make_workload(
    seed: int, horizon_s: int, doc_gpus: int, service_s: float, conc: int
) -> Workload:
    rng = np.random.default_rng(seed)
    t = np.arange(horizon_s, dtype=np.float64)
    chat = 40.0 * (1.0 + 0.3 * np.sin(2 * np.pi * t / horizon_s))  # slow swell, ~25 GPUs
    spiky = np.full(horizon_s, 1.0)  # quiet, with sudden spikes to 60 req/s for 2-4 minutes
    start = 0.0
    while True:
        start += rng.exponential(900.0)
        if start >= horizon_s:
            break
        length = rng.uniform(120, 240)
        spiky[int(start) : int(min(horizon_s, start + length))] = 60.0
    # The document-processing burst: a batch lands and wants `doc_gpus` GPUs for 10 minutes.
    docs = np.zeros(horizon_s)
    burst_at, burst_len = int(horizon_s * 0.45), 600
    docs[burst_at : burst_at + burst_len] = doc_gpus * conc * 0.7 / service_s
    rates = np.vstack([chat, spiky, docs])
    return Workload(
        models=("chat", "spiky", "docs"),
        arrivals=rng.poisson(rates),
        rates=rates,
        description={
            "chat": "40 req/s +-30% slow swell (~25 GPUs)",
            "spiky": "1 req/s with Poisson spikes (mean gap 15 min) to 60 req/s for 2-4 min",
            "docs": f"document burst at t={burst_at}s: {doc_gpus} GPUs worth of requests for "
            f"{burst_len // 60} min",
        },
    )


# --- the simulation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimConfig:
    """Fleet and autoscaler parameters (assumptions; docs/buffer.md says where they come from)."""

    conc: int = 16  #: concurrent requests per replica (assumption)
    target_util: float = 0.7  #: autoscaler target in-flight / capacity (Knative default)
    tick_s: float = 2.0  #: autoscaler tick (Knative tick-interval 2 s)
    scale_down_delay_s: float = 120.0  #: replicas idle this long are removed (assumption)
    rate_window_s: int = 10  #: arrival rate window of the autoscaler (assumption)
    backlog_drain_s: float = 120.0  #: capacity asked to clear a queue backlog in this long
    service_s: float = 6.0  #: mean request duration, prefill + decode (assumption)
    prefill_s: float = 0.15  #: time to first token once a slot is free (assumption)
    supply_cap: int = 3000  #: most GPUs the cloud will give this fleet at once (assumption)
    lp_period_s: float = 30.0  #: LP re-solve period (router-anchors §9.3: 15-30 s)
    miss_cost_factor: float = 10.0  #: cost/h of a waiting scale-up, in GPU-hours (assumption)
    lp_budget_per_hour: float = 64.0  #: the LP's budget row: at most 64 idle GPUs (assumption)
    alloc_sigma: float = 0.3  #: log-normal spread of host allocation time
    boot_sigma: float = 0.15  #: log-normal spread of replica boot time


ARRIVE, DONE, TICK, HOST, READY, LP, SAMPLE = range(7)


class Fleet:
    """One run: a boot mode and a buffer policy (a fixed size, or "lp")."""

    def __init__(
        self,
        work: Workload,
        boot: BootModel,
        buffer: int | str,
        cfg: SimConfig,
        phases: dict[str, Phase],
        seed: int,
    ) -> None:
        self.work, self.boot, self.buffer, self.cfg = work, boot, buffer, cfg
        self.rng = np.random.default_rng(seed + 1)
        self.now = 0.0
        self.events: list[tuple[float, int, int, int]] = []
        self.seq = 0
        n = len(work.models)
        self.queue: list[deque[list[float]]] = [deque() for _ in range(n)]
        self.queued = [0] * n
        self.in_flight = [0] * n
        self.ready = [0] * n
        self.booting = [0] * n
        self.waiting_host = [0] * n  # scale-ups waiting for a host
        self.low_since: list[float | None] = [None] * n
        self.wanted = 0  # replicas the autoscaler wants, all models
        self.pending: deque[int] = deque()  # models whose scale-up waits for a host, FIFO
        self.idle = 0  # buffer hosts
        self.provisioning = 0  # hosts asked of the cloud, not delivered
        self.target = 0 if buffer == "lp" else int(buffer)
        self.ttft: list[tuple[float, int, int]] = []  # (seconds, count, model)
        self.scaleups = self.hits = 0
        self.paid_s = self.ready_s = self.idle_s = self.work_s = 0.0
        self.last = 0.0
        self.peak = 0
        self.series: list[tuple[float, int, int, int, int]] = []
        self.lp_solves: list[float] = []
        self.sizer: BufferSizer | None = None
        if buffer == "lp":
            self.sizer = BufferSizer(
                (self._host_type(),),
                dict.fromkeys(work.models, "gpu"),
                boot_s=dict.fromkeys(work.models, boot.median_s),
                budget_per_hour=cfg.lp_budget_per_hour,
                forecaster=ScaleUpForecaster(short_window_s=60.0, long_window_s=600.0),
                clock=lambda: self.now,
            )
        self.idle = self.target  # a fixed buffer exists before the trace starts

    def _host_type(self) -> HostType:
        busy = sum(self.ready) + sum(self.booting)
        return HostType(
            "gpu",
            price_per_hour=1.0,
            lead_time_s=self.boot.lead_time_s,
            supply=max(0, self.cfg.supply_cap - busy),
            miss_cost_per_hour=self.cfg.miss_cost_factor,
        )

    # events
    def at(self, t: float, kind: int, a: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, a))

    def paid(self) -> int:
        return self.idle + self.provisioning + sum(self.ready) + sum(self.booting)

    def advance(self, t: float) -> None:
        dt = t - self.last
        if dt > 0:
            self.paid_s += self.paid() * dt
            self.ready_s += sum(self.ready) * dt
            self.idle_s += self.idle * dt
            self.work_s += sum(self.in_flight) / self.cfg.conc * dt
        self.last = t
        self.now = t

    def run(self) -> dict[str, Any]:
        horizon = self.work.arrivals.shape[1]
        for second in range(horizon):
            self.at(float(second), ARRIVE, second)
        self.at(0.0, TICK)
        self.at(0.0, SAMPLE)
        if self.sizer is not None:
            self.at(0.0, LP)
        end = horizon + 1800.0  # let queues drain
        self._refill()
        while self.events:
            t, _, kind, a = heapq.heappop(self.events)
            if t > end:
                break
            self.advance(t)
            if kind == ARRIVE:
                for m in range(len(self.work.models)):
                    count = int(self.work.arrivals[m, a])
                    if count:
                        self.queue[m].append([t, float(count)])
                        self.queued[m] += count
                        self.dispatch(m)
            elif kind == DONE:
                self.in_flight[a >> 32] -= a & 0xFFFFFFFF
                self.dispatch(a >> 32)
            elif kind == TICK:
                self.autoscale()
                if t < end:
                    self.at(t + self.cfg.tick_s, TICK)
            elif kind == HOST:
                self.provisioning -= 1
                self.host_arrived()
            elif kind == READY:
                self.booting[a] -= 1
                self.ready[a] += 1
                self.dispatch(a)
            elif kind == LP:
                self.resolve()
                self.at(t + self.cfg.lp_period_s, LP)
            elif kind == SAMPLE:
                demand = self.wanted
                self.series.append((t, demand, sum(self.ready), self.idle, self.paid()))
                self.at(t + 10.0, SAMPLE)
            self.peak = max(self.peak, self.paid())
        return self.report()

    def dispatch(self, m: int) -> None:
        free = self.ready[m] * self.cfg.conc - self.in_flight[m]
        q = self.queue[m]
        while free > 0 and q:
            head = q[0]
            take = int(min(free, head[1]))
            self.ttft.append((self.now - head[0] + self.cfg.prefill_s, take, m))
            head[1] -= take
            if head[1] <= 0:
                q.popleft()
            free -= take
            self.queued[m] -= take
            self.in_flight[m] += take
            service = self.cfg.service_s * float(self.rng.lognormal(-0.125, 0.5))
            self.at(self.now + self.cfg.prefill_s + service, DONE, (m << 32) | take)

    def autoscale(self) -> None:
        cfg = self.cfg
        second = int(self.now)
        lo = max(0, second - cfg.rate_window_s)
        wanted = 0
        for m in range(len(self.work.models)):
            # Little's law on the recent arrival rate, plus enough to clear the backlog in
            # backlog_drain_s: counting every queued request as load would order ~50x the GPUs
            # a spike needs while replicas boot slowly.
            rate = float(self.work.arrivals[m, lo:second].sum()) / max(1, second - lo)
            load = max(float(self.in_flight[m]), rate * cfg.service_s)
            load += self.queued[m] * cfg.service_s / cfg.backlog_drain_s
            desired = math.ceil(load / (cfg.conc * cfg.target_util))
            wanted += desired
            have = self.ready[m] + self.booting[m] + self.waiting_host[m]
            if desired > have:
                self.low_since[m] = None
                for _ in range(desired - have):
                    self.scale_up(m)
            elif desired < self.ready[m] + self.booting[m]:
                if self.waiting_host[m]:  # no longer needed: drop unserved scale-ups first
                    drop = min(self.waiting_host[m], have - desired)
                    self.waiting_host[m] -= drop
                    for _ in range(drop):
                        self.pending.remove(m)
                since = self.low_since[m]
                if since is None:
                    self.low_since[m] = self.now
                elif self.now - since >= cfg.scale_down_delay_s:
                    spare = (self.ready[m] * cfg.conc - self.in_flight[m]) // cfg.conc
                    remove = min(spare, self.ready[m] - desired)
                    for _ in range(max(0, remove)):
                        self.ready[m] -= 1
                        self.host_freed()
                    self.low_since[m] = None
            else:
                self.low_since[m] = None
        self.wanted = wanted
        self._refill()

    def scale_up(self, m: int) -> None:
        self.scaleups += 1
        if self.sizer is not None:
            self.sizer.record_scaleup(self.work.models[m])
        if self.idle > 0:
            self.idle -= 1
            self.hits += 1
            self.start_boot(m)
        else:
            self.waiting_host[m] += 1
            self.pending.append(m)
        self._refill()

    def start_boot(self, m: int) -> None:
        self.booting[m] += 1
        boot = self.boot.median_s * float(self.rng.lognormal(0.0, self.cfg.boot_sigma))
        self.at(self.now + boot, READY, m)

    def host_arrived(self) -> None:
        if self.pending:
            m = self.pending.popleft()
            self.waiting_host[m] -= 1
            self.start_boot(m)
        else:
            self.idle += 1
        self._trim()
        self._release_capacity()

    def host_freed(self) -> None:
        if self.pending:
            m = self.pending.popleft()
            self.waiting_host[m] -= 1
            self.start_boot(m)
        elif self.idle + self.provisioning < self.target:
            self.idle += 1  # back into the buffer (recycled)
        else:
            self._release_capacity()

    def _release_capacity(self) -> None:
        """A host went back to the cloud: room under the supply cap for what is still needed."""
        self._refill()

    def _order(self) -> None:
        self.provisioning += 1
        alloc = self.boot.lead_time_s * float(self.rng.lognormal(0.0, self.cfg.alloc_sigma))
        self.at(self.now + alloc, HOST)

    def _refill(self) -> None:
        """Order hosts for the buffer target and the scale-ups waiting, up to the supply cap."""
        need = self.target + len(self.pending) - (self.idle + self.provisioning)
        for _ in range(max(0, min(need, self.cfg.supply_cap - self.paid()))):
            self._order()

    def _trim(self) -> None:
        surplus = self.idle - self.target
        if surplus > 0:
            self.idle -= surplus
            for _ in range(surplus):
                self._release_capacity()

    def resolve(self) -> None:
        assert self.sizer is not None
        self.sizer.host_types["gpu"] = self._host_type()
        plan = self.sizer.solve()
        self.lp_solves.append(plan.solve_s)
        if plan.ok:
            self.target = plan.targets["gpu"]
            self._trim()
            self._refill()

    def report(self) -> dict[str, Any]:
        arr = np.array(self.ttft, dtype=np.float64)
        served = int(arr[:, 1].sum())
        total = int(self.work.arrivals.sum())

        def pct(rows: np.ndarray, q: float) -> float:
            order = np.argsort(rows[:, 0])
            cum = np.cumsum(rows[order, 1])
            return float(rows[order, 0][np.searchsorted(cum, q * cum[-1])])

        per_model = {}
        for m, name in enumerate(self.work.models):
            rows = arr[arr[:, 2] == m]
            per_model[name] = {"p50_s": pct(rows, 0.5), "p99_s": pct(rows, 0.99)}
        return {
            "ttft_p50_s": pct(arr, 0.5),
            "ttft_p99_s": pct(arr, 0.99),
            "per_model": per_model,
            "requests": total,
            "served": served,
            "scaleups": self.scaleups,
            "buffer_hit_rate": self.hits / self.scaleups if self.scaleups else 0.0,
            "gpu_hours": self.paid_s / 3600,
            "idle_buffer_gpu_hours": self.idle_s / 3600,
            "allocation_utilization": self.ready_s / self.paid_s if self.paid_s else 0.0,
            "work_utilization": self.work_s / self.paid_s if self.paid_s else 0.0,
            "peak_gpus": self.peak,
            "lp_solves": len(self.lp_solves),
            "lp_solve_ms_p50": float(np.median(self.lp_solves) * 1e3) if self.lp_solves else None,
            "lp_solve_ms_max": float(max(self.lp_solves) * 1e3) if self.lp_solves else None,
        }


# --- output ---------------------------------------------------------------------------------------

MODES: list[tuple[str, str, list[int | str]]] = [
    ("no buffer + cold boot", "cold", [0]),
    ("buffer + cold boot", "cold", [2, 8, 32, 128, "lp"]),
    ("buffer + lazy image + restore", "restore", [0, 2, 8, 32, 128, "lp"]),
    # Sensitivity, only once replicas.json exists: every restore as slow as K at once on a host.
    ("buffer + restore, K at once", "restore-k", [32, "lp"]),
    # Sensitivity, once imagefs_snapshot.json exists: every host restores from the snapshot's
    # image, cold (no host keeps or pre-pulls snapshots).
    ("buffer + restore, snap image", "restore-img", [32, "lp"]),
]


def table(runs: list[dict[str, Any]]) -> str:
    base = runs[0]
    head = (
        f"{'setup':31} {'buffer':>6} {'p50 s':>6} {'p99 s':>6} {'p99 x':>5} "
        f"{'spiky p99':>9} {'x':>5} {'docs p99':>8} {'chat p50':>8} {'hits':>4} "
        f"{'alloc util':>10} {'GPU-h':>6} {'cost x':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in runs:
        spiky, base_spiky = r["per_model"]["spiky"]["p99_s"], base["per_model"]["spiky"]["p99_s"]
        lines.append(
            f"{r['setup']:31} {r['buffer']!s:>6} {r['ttft_p50_s']:6.1f} {r['ttft_p99_s']:6.1f} "
            f"{base['ttft_p99_s'] / r['ttft_p99_s']:4.1f}x {spiky:9.1f} {base_spiky / spiky:4.1f}x "
            f"{r['per_model']['docs']['p99_s']:8.1f} {r['per_model']['chat']['p50_s']:8.2f} "
            f"{r['buffer_hit_rate']:4.0%} {r['allocation_utilization']:10.1%} "
            f"{r['gpu_hours']:6.0f} {r['gpu_hours'] / base['gpu_hours']:5.2f}x"
        )
    return "\n".join(lines)


def plot(doc: dict[str, Any], out: Path, timelines: dict[str, list[Any]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = doc["runs"]
    colors = {
        "cold": "#c0504d",
        "restore": "#4f81bd",
        "restore-k": "#8064a2",
        "restore-img": "#4bacc6",
    }
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for setup, mode, _ in MODES:
        rows = [r for r in runs if r["setup"] == setup]
        if not rows:
            continue
        xs = [r["gpu_hours"] for r in rows]
        ys = [r["per_model"]["spiky"]["p99_s"] for r in rows]
        marker = "s" if setup.startswith("no buffer") else "o"
        axes[0].plot(xs, ys, marker=marker, color=colors[mode], label=setup, linestyle="-")
        for r in rows:
            xy = (r["gpu_hours"], r["per_model"]["spiky"]["p99_s"])
            axes[0].annotate(
                str(r["buffer"]), xy, fontsize=8, xytext=(4, 4), textcoords="offset points"
            )
    axes[0].set_yscale("log")
    axes[0].set_xlabel("GPU-hours paid (whole run)")
    axes[0].set_ylabel("p99 request-to-first-token of the spiky model, s (log)")
    axes[0].set_title("Spike p99 TTFT vs cost; labels = buffer size")
    axes[0].legend(fontsize=8)
    labels = [f"{r['boot']}\n{r['buffer']}" for r in runs]
    x = np.arange(len(runs))
    axes[1].bar(
        x, [r["allocation_utilization"] for r in runs], color=[colors[r["boot"]] for r in runs]
    )
    axes[1].set_xticks(x, labels, fontsize=7)
    axes[1].set_ylabel("GPU allocation utilization (ready replica / paid)")
    axes[1].set_title("Utilization per run (red: cold, blue: restore, purple/cyan: sensitivity)")
    fig.tight_layout()
    main = out / "fleet_sim.png"
    fig.savefig(main, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(len(timelines), 1, figsize=(12, 3.0 * len(timelines)), sharex=True)
    for ax, (name, series) in zip(np.atleast_1d(axes), timelines.items(), strict=True):
        s = np.array(series)
        ax.plot(s[:, 0] / 60, s[:, 1], label="GPUs wanted (autoscaler)", color="black", lw=1)
        ax.plot(s[:, 0] / 60, s[:, 2], label="ready replicas", color="#4f81bd", lw=1)
        ax.plot(s[:, 0] / 60, s[:, 3], label="idle buffer", color="#9bbb59", lw=1)
        ax.plot(s[:, 0] / 60, s[:, 4], label="GPUs paid", color="#c0504d", lw=0.8, ls="--")
        ax.set_yscale("symlog", linthresh=10)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("GPUs")
    np.atleast_1d(axes)[0].legend(fontsize=8, loc="upper left")
    np.atleast_1d(axes)[-1].set_xlabel("minutes")
    fig.tight_layout()
    timeline = out / "fleet_sim_timeline.png"
    fig.savefig(timeline, dpi=110)
    plt.close(fig)
    return [main.name, timeline.name]


#: The rows re-run on other seeds: a single trace's spike p99 hangs on a few spikes.
KEY_ROWS = {("cold", 0), ("cold", 32), ("cold", "lp"), ("restore", 0), ("restore", 32)}
KEY_ROWS |= {("restore", 128), ("restore", "lp"), ("restore-k", 32), ("restore-img", 32)}


def robustness(
    seeds: list[int],
    args: argparse.Namespace,
    cfg: SimConfig,
    phases: dict[str, Phase],
    boots: dict[str, BootModel],
    runs: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """The key rows on `seeds` as well as on the main run's: spike p99, overall p99 and cost
    (relative to each seed's own baseline) per seed."""
    if not seeds:
        return []
    rows: dict[tuple[str, str, str], dict[str, list[float]]] = {}

    def add(run: dict[str, Any], base: dict[str, Any]) -> None:
        key = (run["setup"], run["boot"], str(run["buffer"]))
        row = rows.setdefault(key, {"spiky_p99_s": [], "ttft_p99_s": [], "cost_x": []})
        row["spiky_p99_s"].append(run["per_model"]["spiky"]["p99_s"])
        row["ttft_p99_s"].append(run["ttft_p99_s"])
        row["cost_x"].append(run["gpu_hours"] / base["gpu_hours"])

    for run in runs:
        if (run["boot"], run["buffer"]) in KEY_ROWS:
            add(run, runs[0])
    for seed in seeds:
        work = make_workload(seed, int(args.hours * 3600), args.doc_gpus, cfg.service_s, cfg.conc)
        base: dict[str, Any] | None = None
        for setup, mode, sizes in MODES:
            for size in sizes:
                if (mode, size) not in KEY_ROWS or mode not in boots:
                    continue
                result = Fleet(work, boots[mode], size, cfg, phases, seed).run()
                run = {"setup": setup, "boot": mode, "buffer": size, **result}
                base = base or run
                add(run, base)
    return [
        {"setup": setup, "boot": boot, "buffer": buffer, "seeds": [args.seed, *seeds], **values}
        for (setup, boot, buffer), values in rows.items()
    ]


def robust_table(rows: list[dict[str, Any]]) -> str:
    def cell(values: list[float], fmt: str) -> str:
        return f"{np.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"

    head = f"{'setup':31} {'buffer':>6} {'spiky p99 s':>18} {'p99 s':>18} {'cost x':>17}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['setup']:31} {r['buffer']:>6} {cell(r['spiky_p99_s'], '.0f'):>18} "
            f"{cell(r['ttft_p99_s'], '.0f'):>18} {cell(r['cost_x'], '.2f'):>17}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--hours", type=float, default=3.0)
    parser.add_argument("--doc-gpus", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--other-seeds",
        default="8,9,10",
        help="seeds of the robustness table (the key rows on other traces); '' to skip",
    )
    args = parser.parse_args(argv)

    started = time.perf_counter()
    cfg = SimConfig()
    phases = load_phases()
    boots = boot_models(phases)
    work = make_workload(args.seed, int(args.hours * 3600), args.doc_gpus, cfg.service_s, cfg.conc)

    print(
        "Boot phases (seconds; label: measured here / cited public figure / derived / placeholder)"
    )
    for name, p in phases.items():
        print(f"  {name:22} {p.seconds:7.1f}  [{p.label}] {p.source}")
    for b in boots.values():
        print(
            f"  => {b.name:7} replica boot on a ready host {b.median_s:6.1f} s; "
            f"new host lead time {b.lead_time_s:.0f} s"
        )
    print("Workload:", "; ".join(f"{k}: {v}" for k, v in work.description.items()))

    runs: list[dict[str, Any]] = []
    timelines: dict[str, list[Any]] = {}
    for setup, mode, sizes in MODES:
        if mode not in boots:
            print(f"({setup}: not simulated, its measured input is not in results/ yet)")
            continue
        for size in sizes:
            fleet = Fleet(work, boots[mode], size, cfg, phases, args.seed)
            result = fleet.run()
            runs.append({"setup": setup, "boot": mode, "buffer": size, **result})
            if (mode, size) in {("cold", 0), ("cold", "lp"), ("restore", 8), ("restore", "lp")}:
                timelines[f"{setup}, buffer {size}"] = fleet.series
    seeds = [int(x) for x in args.other_seeds.split(",") if x.strip()]
    robust = robustness(seeds, args, cfg, phases, boots, runs)
    elapsed = time.perf_counter() - started

    print()
    print(table(runs))
    print(
        "\np99 x: baseline p99 / this p99 (baseline: no buffer + cold boot); cost x: GPU-hours / "
        "baseline's. alloc util: GPU time holding a ready replica / GPU time paid."
    )
    lp_runs = [r for r in runs if r["buffer"] == "lp"]
    for r in lp_runs:
        print(
            f"LP ({r['setup']}): {r['lp_solves']} solves, median {r['lp_solve_ms_p50']:.1f} ms, "
            f"max {r['lp_solve_ms_max']:.1f} ms"
        )
    if robust:
        print(f"\nSame rows on seeds {args.seed},{args.other_seeds} (median [min-max]):")
        print(robust_table(robust))
    print(f"simulated in {elapsed:.1f} s")

    doc = {
        "benchmark": "fleet_sim",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seed": args.seed,
        "hours": args.hours,
        "baseline": "no buffer + cold boot",
        "phases": {k: asdict(v) for k, v in phases.items()},
        "boot_models": {k: asdict(v) for k, v in boots.items()},
        "config": asdict(cfg),
        "workload": work.description,
        "runs": runs,
        "robustness": robust,
        "elapsed_s": elapsed,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "fleet_sim.json"
    if not args.no_plot:
        doc["plots"] = plot(doc, args.out, timelines)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
