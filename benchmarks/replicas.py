"""Many replicas: K restored in parallel from one snapshot by the agent vs K cold boots.

In one run, for K in --ks (default 1,2,4):
  1. K plain `vllm serve` processes of the tiny model started at once (the baseline; compile
     cache warm from the snapshot's own cold boot), timed until every one has answered a request;
  2. K replicas restored at once by `fastboot agent` (one POST /v1/replicas), timed from the POST
     until every one has answered a request through its own address, --runs times;
  3. memory per restored replica: RSS and PSS summed over each replica's processes (PSS counts a
     page shared by N processes as 1/N: what a replica really costs the host).

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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastboot.models.tiny import cpu_serve_flags, write_tiny_llama  # noqa: E402
from fastboot.serve import free_port  # noqa: E402
from fastboot.supervisor import tree_pids  # noqa: E402
from tests.agents import Agent, create_snapshot, isolated_flags, start_agent  # noqa: E402

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
    """Seconds until k plain `vllm serve` started at once have all answered."""
    vllm = str(Path(sys.executable).with_name("vllm"))
    ports = [free_port() for _ in range(k)]
    procs = []
    start = time.monotonic()
    with log.open("ab") as out:
        for port in ports:
            argv = [vllm, "serve", str(model), "--port", str(port), *cpu_serve_flags("tiny")]
            procs.append(
                subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
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


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB summed over pid's process tree."""
    rss = pss = 0
    for p in tree_pids(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                name, _, value = line.partition(":")
                if name == "Rss":
                    rss += int(value.split()[0])
                elif name == "Pss":
                    pss += int(value.split()[0])
        except OSError:
            continue
    return rss, pss


def restores(agent: Agent, snapshot_id: str, k: int) -> tuple[float, list[dict[str, object]]]:
    """Seconds from one POST of k replicas until all answered; the replicas (still running)."""
    start = time.monotonic()
    started = agent.ok("POST", "/v1/replicas", {"snapshot": snapshot_id, "count": k})["replicas"]
    ready = [agent.wait_ready(str(r["id"])) for r in started]
    for replica in ready:
        while not answered(str(replica["address"]), str(replica["model"])):
            if time.monotonic() - start > 300:
                raise RuntimeError(f"replica {replica['id']} never answered")
            time.sleep(0.02)
    return time.monotonic() - start, ready


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="1,2,4")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "replicas.json")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="fastboot-replicas-") as tmp:
        work = Path(tmp)
        model = write_tiny_llama(work / "tiny", "tiny")
        print("making the snapshot (fastboot snapshot create)", flush=True)
        snapshot_id = create_snapshot(model, work / "snapshots", work / "create.log")
        agent = start_agent(
            work / "snapshots", work / "state", work / "agent.log", name="bench", slots=max(ks)
        )
        try:
            for k in ks:
                cold = cold_boots(model, k, work / "cold.log")
                times, memory = [], []
                for _ in range(args.runs):
                    elapsed, ready = restores(agent, snapshot_id, k)
                    times.append(elapsed)
                    memory = [memory_kib(int(str(r["pid"]))) for r in ready]
                    for replica in ready:
                        agent.ok("DELETE", f"/v1/replicas/{replica['id']}")
                restore_s = statistics.median(times)
                row = {
                    "k": k,
                    "cold_boots_s": cold,
                    "restores_s": times,
                    "restore_median_s": restore_s,
                    "speedup": cold / restore_s,
                    "rss_mib_per_replica": statistics.mean(m[0] for m in memory) / 1024,
                    "pss_mib_per_replica": statistics.mean(m[1] for m in memory) / 1024,
                }
                results.append(row)
                print(f"K={k}: {cold:.1f} s cold, {restore_s:.2f} s restored {times}", flush=True)
        finally:
            agent.stop()
    one = next(r["restore_median_s"] for r in results if r["k"] == 1) if 1 in ks else None
    print(
        f"\n{'K':>2} {'K cold boots':>13} {'K restores':>11} {'speedup':>8} {'vs K=1':>7} "
        f"{'RSS/replica':>12} {'PSS/replica':>12}"
    )
    for r in results:
        versus = f"{float(str(r['restore_median_s'])) / one:.2f}x" if one else "-"
        r["restore_vs_one"] = float(str(r["restore_median_s"])) / one if one else None
        print(
            f"{r['k']:>2} {r['cold_boots_s']:>12.1f}s {r['restore_median_s']:>10.2f}s "
            f"{r['speedup']:>7.1f}x {versus:>7} {r['rss_mib_per_replica']:>9.0f} MiB "
            f"{r['pss_mib_per_replica']:>9.0f} MiB"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": "replicas",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "engine_flags": isolated_flags(),
        "runs": args.runs,
        "results": results,
    }
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
