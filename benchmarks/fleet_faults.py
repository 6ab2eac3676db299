"""Host loss under real load: what a lost host costs the requests, and how fast capacity is back.

One run, on this machine (tests/fleet.py: four real agents in network namespaces as hosts, a
real router process with a buffer of them, two real vLLM CPU replicas of the tiny model,
restored; load from `vllm bench serve`, streamed completions at a fixed rate):

  1. baseline: a router with one replica; the same load straight to that replica and through
     the router, --runs times interleaved: the router's overhead on TTFT p50 (one replica, so
     the router's runs do not also pay for a second engine on this machine's cores);
  2. for each fault, SIGKILL (agent and replicas: a crashed host) and a cut veth (a partition:
     nothing is reset), one bench run "during" with the fault injected --fault-at s in, then
     one "after" once capacity is back. A sampler polls the router's /health every 50 ms for
     the timeline: ready replicas, idle buffer hosts, when the lost host left routing
     (detection), when both replicas were ready again (capacity back: the replacement restored)
     and when the buffer held an idle host again (refilled: a host admitted by the short check).

Requests sent / succeeded / failed / hung per run (hung: not finished by bench's deadline,
--deadline-s), `vllm bench serve`'s own throughput and TTFT p50/p99, and the number of requests
in flight on the lost host when it was lost (failures must not exceed it).
Prints a table; writes benchmarks/results/fleet_faults.json and fleet_faults.png.

    .venv/bin/python benchmarks/fleet_faults.py [--prompts 80] [--rate 4] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.router_bench import router_metric  # noqa: E402
from fastboot.models.tiny import write_tiny_llama  # noqa: E402
from fastboot.serve import free_port  # noqa: E402
from tests.agents import create_snapshot  # noqa: E402
from tests.fleet import (  # noqa: E402
    FleetHost,
    bench,
    fleet,
    health,
    members,
    router_config,
    router_process,
    wait_for,
)

RESULTS = ROOT / "benchmarks" / "results"
HOSTS, REPLICAS = 4, 2


class Sampler:
    """The router's view every 50 ms: (t, ready replicas by host, idle hosts)."""

    def __init__(self, router: Any) -> None:
        self.router = router
        self.rows: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.monotonic()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                doc = health(self.router)
            except OSError:
                doc = None
            if doc is not None:
                model = doc["models"]["tiny"]
                self.rows.append(
                    {
                        "t": time.monotonic() - self.t0,
                        "ready": sorted(
                            m["agent"] for m in model["members"] if m["state"] == "ready"
                        ),
                        "routed": sorted(m["agent"] for m in model["members"]),
                        "inflight": {m["agent"]: m["inflight"] for m in model["members"]},
                        "idle": sorted(h["name"] for h in doc["buffer"] if h["state"] == "idle"),
                    }
                )
            self._stop.wait(0.05)


def settled(router: Any, replicas: int = REPLICAS) -> bool:
    doc = health(router)
    ready = {m["agent"] for m in doc["models"]["tiny"]["members"] if m["state"] == "ready"}
    idle = [h for h in doc["buffer"] if h["state"] == "idle"]
    routed = len(doc["models"]["tiny"]["members"])
    return len(ready) == replicas == routed and len(idle) == 1


def no_replicas(hosts: list[FleetHost]) -> bool:
    """No replica left running on any host (a deleted one stays listed as `stopped`)."""
    return not [
        r
        for h in hosts
        if h.agent is not None
        for r in h.agent.ok("GET", "/v1/replicas")["replicas"]
        if r["state"] != "stopped"
    ]


def baseline_runs(
    hosts: list[FleetHost],
    router: Any,
    served: str,
    load: tuple[Path, int, float],
    args: Any,
    out: Path,
) -> dict[str, list[dict[str, Any]]]:
    """The same load straight to the router's one replica, through the router, and through the
    router running at a higher CPU priority (nice -10: on these 2 cores, which share of the
    overhead is waiting for a core rather than the router's code), interleaved."""
    direct_url = replica_url(hosts, router)
    baseline: dict[str, list[dict[str, Any]]] = {"direct": [], "router": [], "router_nice": []}
    targets = (
        ("direct", direct_url, served, 0),
        ("router", router.url, "tiny", 0),
        ("router_nice", router.url, "tiny", -10),
    )
    for run in range(args.runs):
        for where, url, name, nice in targets:
            print(f"baseline {where} run {run + 1}...", flush=True)
            os.setpriority(os.PRIO_PROCESS, router.proc.pid, nice)
            try:
                result = bench(url, name, *load, out / f"{where}-{run}.json", args.deadline_s)
            finally:
                os.setpriority(os.PRIO_PROCESS, router.proc.pid, 0)
            baseline[where].append(summary(result, args.prompts))
    return baseline


def own_overhead_ms(router: Any) -> float:
    """The router's own time per request (router_proxy_overhead_seconds: before dispatch and
    after the last byte, not the waiting), mean over everything it proxied so far."""
    total = router_metric(router.url, "router_proxy_overhead_seconds_sum")
    return 1000 * total / router_metric(router.url, "router_proxy_overhead_seconds_count")


def summary(result: dict[str, Any], prompts: int) -> dict[str, Any]:
    completed = int(result.get("completed", 0))
    failed = int(result.get("failed", prompts - completed))
    return {
        "sent": prompts,
        "succeeded": completed,
        "failed": failed,
        "hung": max(0, prompts - completed - failed),
        "request_throughput": result.get("request_throughput"),
        "output_throughput": result.get("output_throughput"),
        "ttft_p50_ms": result.get("median_ttft_ms"),
        "ttft_p99_ms": result.get("p99_ttft_ms"),
        "e2el_max_ms": result.get("p100_e2el_ms"),
    }


def faulted_run(
    name: str,
    router: Any,
    victim: FleetHost,
    args: argparse.Namespace,
    bench_args: tuple[str, str, Path, int, float],
    out: Path,
) -> dict[str, Any]:
    """One bench run with the fault injected args.fault_at s in; the timeline around it."""
    act = victim.kill if name == "kill" else victim.cut
    marks: dict[str, Any] = {}

    def inject(sampler: Sampler) -> None:
        time.sleep(args.fault_at)
        before = {m["agent"]: m["inflight"] for m in members(router)}
        act()
        marks["fault"] = time.monotonic() - sampler.t0
        after = {m["agent"]: m["inflight"] for m in members(router)}
        marks["inflight_on_lost"] = max(before.get(victim.name, 0), after.get(victim.name, 0))

    with Sampler(router) as sampler:
        thread = threading.Thread(target=inject, args=(sampler,))
        thread.start()
        result = bench(*bench_args, out / f"{name}-during.json", timeout_s=args.deadline_s)
        thread.join()
        wait_for("capacity back", lambda: settled(router), 120, router.log)
        time.sleep(0.2)
    rows = sampler.rows
    fault = marks["fault"]
    detected = next(r["t"] for r in rows if r["t"] > fault and victim.name not in r["routed"])
    # Capacity: as many ready replicas as before the loss (the replacement restored). The buffer
    # refilled (an idle host short-checked, self-test included) is reported on its own.
    restored = next(r["t"] for r in rows if r["t"] > detected and len(set(r["ready"])) == REPLICAS)
    refilled = next(
        r["t"]
        for r in rows
        if r["t"] >= restored and len(set(r["ready"])) == REPLICAS and len(r["idle"]) == 1
    )
    return {
        "fault": name,
        "victim": victim.name,
        "during": summary(result, args.prompts),
        "inflight_on_lost": marks["inflight_on_lost"],
        "detect_s": detected - fault,
        "capacity_back_after_detect_s": restored - detected,
        "buffer_refilled_after_detect_s": refilled - detected,
        "timeline": rows,
        "fault_t": fault,
        "detected_t": detected,
        "restored_t": restored,
        "refilled_t": refilled,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=80)
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second")
    parser.add_argument("--runs", type=int, default=3, help="baseline runs, interleaved")
    parser.add_argument("--fault-at", type=float, default=8.0, help="seconds into the run")
    parser.add_argument("--deadline-s", type=float, default=300.0)
    parser.add_argument("--faults", default="kill,cut", help="which, in order: kill, cut")
    parser.add_argument("--keep", type=Path, help="keep logs and bench details in this directory")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fleet-faults-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = write_tiny_llama(work / "tiny")
        snapshots = work / "snapshots"
        print("creating the snapshot (one cold boot)...", flush=True)
        snapshot_id = create_snapshot(model, snapshots, work / "create.log")
        out = work / "bench"
        with fleet(snapshots, work, HOSTS) as hosts:
            assert hosts[0].agent is not None
            (listed,) = hosts[0].agent.ok("GET", "/v1/snapshots")["snapshots"]
            served = listed["served_model_name"]
            load: tuple[Path, int, float] = (model, args.prompts, args.rate)
            # The overhead baseline: a router with ONE replica, so that both ways the same
            # replica (and only it) computes; with two, the router's runs would also pay for a
            # second engine sharing this machine's cores. The router deletes it on exit.
            port = free_port()
            config = router_config(work, hosts, snapshot_id, served, port, 1)
            with router_process(config, port, work / "router-baseline.log") as router:
                wait_for("one replica and buffer", lambda: settled(router, 1), 300, router.log)
                baseline = baseline_runs(hosts, router, served, load, args, out)
                router_own_ms = own_overhead_ms(router)
            wait_for(
                "the baseline replica gone",
                lambda: no_replicas(hosts),
                60,
                work / "router-baseline.log",
            )
            port = free_port()
            config = router_config(work, hosts, snapshot_id, served, port, REPLICAS)
            with router_process(config, port, work / "router.log") as router:
                wait_for("replicas and buffer", lambda: settled(router), 300, router.log)
                faults = []
                for name in args.faults.split(","):
                    victim = next(
                        h for h in hosts if h.name in {m["agent"] for m in members(router)}
                    )
                    print(f"{name}: {victim.name} under load...", flush=True)
                    try:
                        row = faulted_run(
                            name, router, victim, args, (router.url, "tiny", *load), out
                        )
                    finally:
                        if name == "cut":
                            victim.heal()
                    print(f"{name}: after...", flush=True)
                    path = out / f"{name}-after.json"
                    after = bench(router.url, "tiny", *load, path, args.deadline_s)
                    row["after"] = summary(after, args.prompts)
                    faults.append(row)
                    if name == "kill":
                        victim.start()  # as systemd would: it rejoins, cleaned
    report: dict[str, Any] = {
        "benchmark": "fleet_faults",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "load": {"prompts": args.prompts, "rate_per_s": args.rate, "input": 32, "output": 16},
        "router": {"host_probe_s": 0.5, "host_lost_s": 2.0},
        "baseline": baseline,
        "faults": faults,
    }
    direct_p50 = median(baseline["direct"], "ttft_p50_ms")
    report["router_overhead_ttft_p50_ms"] = median(baseline["router"], "ttft_p50_ms") - direct_p50
    report["router_nice_overhead_ttft_p50_ms"] = (
        median(baseline["router_nice"], "ttft_p50_ms") - direct_p50
    )
    report["router_own_time_per_request_ms"] = router_own_ms
    print_table(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fleet_faults.json").write_text(json.dumps(report, indent=1) + "\n")
    if not args.no_plot:
        plot(report, RESULTS / "fleet_faults.png")
    return 0


def replica_url(hosts: list[FleetHost], router: Any) -> str:
    """The address of one ready replica, as its agent reports it (routed to from here)."""
    name = members(router)[0]["agent"]
    host = next(h for h in hosts if h.name == name)
    assert host.agent is not None
    (replica,) = [
        r for r in host.agent.ok("GET", "/v1/replicas")["replicas"] if r["state"] == "ready"
    ]
    return str(replica["address"])


def median(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def print_table(report: dict[str, Any]) -> None:
    base = report["baseline"]
    print("\nbaseline (medians of", len(base["direct"]), "runs)")
    print(f"{'':24}{'direct':>10}{'router':>10}{'diff':>10}{'nice -10':>10}{'diff':>10}")
    for key in ("ttft_p50_ms", "ttft_p99_ms", "request_throughput"):
        d, r = median(base["direct"], key), median(base["router"], key)
        n = median(base["router_nice"], key)
        print(f"{key:24}{d:10.2f}{r:10.2f}{r - d:10.2f}{n:10.2f}{n - d:10.2f}")
    print("\nfaults")
    header = f"{'':14}{'sent':>6}{'ok':>6}{'fail':>6}{'hung':>6}{'inflight':>9}"
    print(header + f"{'tput':>8}{'p50':>8}{'p99':>9}{'detect':>8}{'back':>7}{'refill':>8}")
    for row in report["faults"]:
        for phase in ("during", "after"):
            s = row[phase]
            extra = (
                f"{row['detect_s']:8.2f}{row['capacity_back_after_detect_s']:7.2f}"
                f"{row['buffer_refilled_after_detect_s']:8.2f}"
                if phase == "during"
                else ""
            )
            inflight = row["inflight_on_lost"] if phase == "during" else ""
            print(
                f"{row['fault'] + ' ' + phase:14}{s['sent']:6}{s['succeeded']:6}{s['failed']:6}"
                f"{s['hung']:6}{inflight!s:>9}{s['request_throughput']:8.2f}"
                f"{s['ttft_p50_ms']:8.1f}{s['ttft_p99_ms']:9.1f}{extra}"
            )
    print(f"\nrouter overhead on TTFT p50: {report['router_overhead_ttft_p50_ms']:.2f} ms")
    print(f"  at nice -10: {report['router_nice_overhead_ttft_p50_ms']:.2f} ms")
    print(f"  the router's own time per request: {report['router_own_time_per_request_ms']:.3f} ms")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    faults = report["faults"]
    fig, axes = plt.subplots(len(faults), 1, figsize=(9, 3.2 * len(faults)), squeeze=False)
    for ax, row in zip(axes[:, 0], faults, strict=True):
        t = [r["t"] for r in row["timeline"]]
        ax.step(t, [len(r["ready"]) for r in row["timeline"]], where="post", label="ready replicas")
        ax.step(
            t, [len(r["idle"]) for r in row["timeline"]], where="post", label="idle buffer hosts"
        )
        ax.step(
            t,
            [sum(r["inflight"].values()) for r in row["timeline"]],
            where="post",
            label="requests in flight",
            alpha=0.5,
        )
        for key, label, style in (
            ("fault_t", "fault", "r--"),
            ("detected_t", "detected", "k:"),
            ("restored_t", "capacity back", "g-."),
            ("refilled_t", "buffer refilled", "b:"),
        ):
            ax.axvline(row[key], color=style[0], linestyle=style[1:], label=label)
        during = row["during"]
        ax.set_title(
            f"{row['fault']} of {row['victim']}: {during['succeeded']}/{during['sent']} ok, "
            f"{during['failed']} failed ({row['inflight_on_lost']} in flight there), "
            f"detect {row['detect_s']:.2f} s, back +{row['capacity_back_after_detect_s']:.2f} s"
        )
        ax.set_xlabel("s")
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
