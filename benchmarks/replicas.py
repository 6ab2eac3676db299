"""Many replicas: K restored in parallel from one snapshot by the agent vs K cold boots.

In one run, for K in --ks (default 1,2,4):
  1. K plain `vllm serve` processes of the tiny model started at once (the baseline; compile
     cache warm from the snapshot's own cold boot), timed until every one has answered a request;
  2. K replicas restored at once by `fastboot agent` (one POST /v1/replicas), timed from the POST
     until every one has answered a request through its own address, --runs times, in both ways
     a restore can fill memory, alternating: page images mapped copy-on-write (fastboot's CRIU
     patch, the default) and every page copied (an agent started with FASTBOOT_COPY_PAGES=1,
     which is what upstream CRIU does). Without the patched CRIU only the copied rows are run;
  3. memory per restored replica: RSS and PSS summed over each replica's processes (PSS counts a
     page shared by N processes as 1/N: what a replica really costs the host);
  4. the host's busy CPU-seconds from the POST until all answered (/proc/stat, every process:
     CRIU, the restored engines, the agent, this client). Divided by the host's cores it is the
     floor under the wall time of K restores on this host, whatever the code does in parallel.

Prints a table with medians and ratios; writes benchmarks/results/replicas.json.

    .venv/bin/python benchmarks/replicas.py [--ks 1,2,4] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastboot.models.tiny import cpu_serve_flags, write_tiny_llama  # noqa: E402
from fastboot.serve import free_port  # noqa: E402
from fastboot.snapshot.criu import find_criu  # noqa: E402
from tests.agents import (  # noqa: E402
    Agent,
    create_snapshot,
    isolated_flags,
    memory_kib,
    start_agent,
)

RESULTS = ROOT / "benchmarks" / "results"


def answered(base_url: str, model: str) -> bool:
    body = json.dumps({"model": model, "prompt": "hi", "max_tokens": 2, "temperature": 0})
    request = urllib.request.Request(
        f"{base_url}/v1/completions",
        data=body.encode(),
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def cold_boots(model: Path, k: int, log: Path) -> float:
    """Seconds until k plain `vllm serve` started at once have all answered. Their ZMQ ipc
    sockets go next to the log (vLLM's default, /tmp, keeps them after the servers stop)."""
    vllm = str(Path(sys.executable).with_name("vllm"))
    ports = [free_port() for _ in range(k)]
    rpc_dir = log.parent / "rpc"
    rpc_dir.mkdir(exist_ok=True)
    env = {**os.environ, "VLLM_RPC_BASE_PATH": str(rpc_dir)}
    procs = []
    start = time.monotonic()
    with log.open("ab") as out:
        for port in ports:
            argv = [vllm, "serve", str(model), "--port", str(port), *cpu_serve_flags("tiny")]
            procs.append(
                subprocess.Popen(
                    argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
            )
    try:
        pending = set(ports)
        while pending:
            if time.monotonic() - start > 900 or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"cold boots failed; see {log}")
            pending = {p for p in pending if not answered(f"http://127.0.0.1:{p}", str(model))}
            time.sleep(0.2)
        return time.monotonic() - start
    finally:
        for proc in procs:
            with_kill(proc)


def with_kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def busy_cpu_s() -> float:
    """CPU-seconds the host has spent busy since boot, all cores (user+nice+system+irq+softirq
    +steal from /proc/stat)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:9]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def restores(agent: Agent, snapshot_id: str, k: int) -> tuple[float, list[dict[str, object]]]:
    """Seconds from one POST of k replicas until all answered; the replicas (still running).
    Each replica is awaited and asked by a client of its own, as k independent users would."""
    start = time.monotonic()
    started = agent.ok("POST", "/v1/replicas", {"snapshot": snapshot_id, "count": k})["replicas"]

    def ready_and_answered(replica_id: str) -> dict[str, object]:
        replica = agent.wait_ready(replica_id)
        while not answered(str(replica["address"]), str(replica["model"])):
            if time.monotonic() - start > 300:
                raise RuntimeError(f"replica {replica_id} never answered")
            time.sleep(0.02)
        return replica

    with ThreadPoolExecutor(max_workers=k) as pool:
        ready = list(pool.map(ready_and_answered, [str(r["id"]) for r in started]))
    return time.monotonic() - start, ready


def restore_once(
    agent: Agent, snapshot_id: str, k: int
) -> tuple[float, float, list[tuple[int, int]]]:
    """One restore of k replicas through agent: its seconds, the host's busy CPU-seconds
    meanwhile, and each replica's (RSS, PSS) KiB; the replicas are stopped afterwards."""
    cpu_before = busy_cpu_s()
    elapsed, ready = restores(agent, snapshot_id, k)
    cpu = busy_cpu_s() - cpu_before
    memory = [memory_kib(int(str(r["pid"]))) for r in ready]
    for replica in ready:
        agent.ok("DELETE", f"/v1/replicas/{replica['id']}")
    return elapsed, cpu, memory


def start_agents(work: Path, slots: int, mapped: bool) -> dict[str, Agent]:
    """One agent per way of filling memory: "copied" (FASTBOOT_COPY_PAGES=1) and, with the
    patched CRIU, "mapped"."""
    modes = {"copied": ("bcopy", "1"), "mapped": ("bmap", "0")}
    return {
        mode: start_agent(
            work / "snapshots",
            work / f"state-{mode}",
            work / f"agent-{mode}.log",
            name=name,
            slots=slots,
            prefix=["env", f"FASTBOOT_COPY_PAGES={copy}"],
        )
        for mode, (name, copy) in modes.items()
        if mapped or mode == "copied"
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="1,2,4")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "replicas.json")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    criu = find_criu()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fastboot-replicas-") as tmp:
        work = Path(tmp)
        model = write_tiny_llama(work / "tiny", "tiny")
        print("making the snapshot (fastboot snapshot create)", flush=True)
        snapshot_id = create_snapshot(model, work / "snapshots", work / "create.log")
        agents = start_agents(work, max(ks), criu.maps_pages)
        try:
            for k in ks:
                cold = cold_boots(model, k, work / "cold.log")
                row: dict[str, Any] = {"k": k, "cold_boots_s": cold}
                # One run at a time per mode, alternating, so drift hits both alike.
                runs: dict[str, list[tuple[float, float, list[tuple[int, int]]]]] = {
                    m: [] for m in agents
                }
                for _ in range(args.runs):
                    for mode, agent in agents.items():
                        runs[mode].append(restore_once(agent, snapshot_id, k))
                for mode, measured in runs.items():
                    times = [seconds for seconds, _, _ in measured]
                    cpu = statistics.median(cpu for _, cpu, _ in measured)
                    memory = measured[-1][2]
                    row[mode] = {
                        "restores_s": times,
                        "restore_median_s": statistics.median(times),
                        "cpu_median_s": cpu,
                        "cpu_s_per_replica": cpu / k,
                        "cpu_floor_s": cpu / (os.cpu_count() or 1),
                        "speedup": cold / statistics.median(times),
                        "rss_mib_per_replica": statistics.mean(m[0] for m in memory) / 1024,
                        "pss_mib_per_replica": statistics.mean(m[1] for m in memory) / 1024,
                    }
                    print(f"K={k} {mode}: {cold:.1f} s cold, restores {times}", flush=True)
                results.append(row)
        finally:
            for agent in agents.values():
                agent.stop()
    print_table(results, list(agents))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": "replicas",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "criu": {"path": criu.path, "version": criu.version_text, "maps_pages": criu.maps_pages},
        "engine_flags": isolated_flags(),
        "runs": args.runs,
        "results": results,
    }
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


def print_table(results: list[dict[str, Any]], modes: list[str]) -> None:
    """Medians per K and mode with their ratios; adds restore_vs_one (each mode against its own
    K=1) and mapped_vs_copied to the results."""
    one = {m: next((r[m]["restore_median_s"] for r in results if r["k"] == 1), None) for m in modes}
    print(
        f"\n{'K':>2} {'mode':>7} {'K cold boots':>13} {'K restores':>11} {'speedup':>8} "
        f"{'vs K=1':>7} {'CPU-s':>6} {'floor':>6} {'RSS/replica':>12} {'PSS/replica':>12}"
    )
    for r in results:
        for mode in modes:
            m = r[mode]
            m["restore_vs_one"] = m["restore_median_s"] / one[mode] if one[mode] else None
            versus = f"{m['restore_vs_one']:.2f}x" if one[mode] else "-"
            print(
                f"{r['k']:>2} {mode:>7} {r['cold_boots_s']:>12.1f}s "
                f"{m['restore_median_s']:>10.2f}s {m['speedup']:>7.1f}x {versus:>7} "
                f"{m['cpu_median_s']:>6.2f} {m['cpu_floor_s']:>5.2f}s "
                f"{m['rss_mib_per_replica']:>9.0f} MiB {m['pss_mib_per_replica']:>9.0f} MiB"
            )
    if "mapped" in modes:
        for r in results:
            r["mapped_vs_copied"] = (
                r["copied"]["restore_median_s"] / r["mapped"]["restore_median_s"]
            )
            print(f"K={r['k']}: mapped restores {r['mapped_vs_copied']:.1f}x faster than copied")
    print(
        f"CPU-s: the host's busy CPU-seconds per K restores; floor: CPU-s / {os.cpu_count()} cores,"
        " the least wall time those CPU-seconds need here"
    )


if __name__ == "__main__":
    raise SystemExit(main())
