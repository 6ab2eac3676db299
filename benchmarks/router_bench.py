"""Router overhead: the same requests sent to an upstream directly and through `fastboot router`.

The upstream is a FAST FAKE engine (a minimal aiohttp server answering a fixed small JSON, or an
SSE stream it holds open), not vLLM: the point is to isolate what the router adds, which a real
engine's milliseconds of compute would hide. Three processes on this host: the fake upstream
(plus a fake agent that reports it as one ready replica, adopted by the router at start), the
router (`python -m fastboot router --config ...`, uvloop) and this load generator.

Measured in one run:
  1. added latency: sequential small non-streaming requests, direct vs through the router,
     interleaved in blocks; p50/p99 of each and of the difference (targets: <= 1 ms p50 and
     <= 5 ms p99 added);
  2. throughput: requests/s through the router at a fixed concurrency, and requests/s per core
     of the router's own CPU time (from /proc/PID/stat);
  3. open streams: N concurrent SSE streams held open through the router, each checked to have
     received its first event; the router's RSS while holding them;
  4. scale from zero: the first request of a model at zero replicas, whose fake agent makes the
     replica ready exactly RESTORE_S after the placement POST; the router's share is the
     request's latency minus RESTORE_S (target: <= 100 ms). One sample per model `cold-I`.

    .venv/bin/python benchmarks/router_bench.py [--requests 2000] [--streams 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: How long the fake agent's "restore" takes in the scale-from-zero measurement.
RESTORE_S = 0.5
RESULTS = ROOT / "benchmarks" / "results"
BODY = json.dumps({"model": "bench", "prompt": "hello", "max_tokens": 4}).encode()
STREAM_BODY = json.dumps({"model": "bench", "prompt": "hi", "stream": True}).encode()
ANSWER = json.dumps(
    {
        "id": "cmpl-bench",
        "object": "text_completion",
        "model": "bench",
        "choices": [{"index": 0, "text": " world", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5},
    }
).encode()


# --- the upstream process --------------------------------------------------------------------


def serve_upstream(port: int, agent_port: int) -> None:
    """Fake engine on `port` and a fake agent on `agent_port` reporting it as ready."""
    import uvloop
    from aiohttp import web

    from fastboot.router.testing import FakeAgent

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if b'"stream": true' not in body:
            return web.Response(body=ANSWER, content_type="application/json")
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        await out.write(b'data: {"choices":[{"text":"a"}]}\n\n')
        await asyncio.sleep(3600)  # held open until the client goes away
        return out

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        app.router.add_get("/health", health)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
        agent = FakeAgent(
            lambda snapshot: f"http://127.0.0.1:{port}",
            token="bench",
            model="bench",
            slots=1000,
            ready_after_s=RESTORE_S,
        )
        agent.add_replica("bench-snapshot", state="ready")
        await agent.start(agent_port)
        await asyncio.Event().wait()

    uvloop.run(main())


# --- helpers ---------------------------------------------------------------------------------


def wait_http(url: str, proc: subprocess.Popen[bytes], deadline_s: float = 30.0) -> None:
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {deadline_s} s")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- measurements ----------------------------------------------------------------------------


async def latency(direct: str, routed: str, total: int, block: int = 100) -> dict[str, Any]:
    import aiohttp

    samples: dict[str, list[float]] = {"direct": [], "router": []}
    async with aiohttp.ClientSession() as http:

        async def one(url: str) -> float:
            start = time.perf_counter()
            async with http.post(url, data=BODY, headers={"Content-Type": "application/json"}) as r:
                await r.read()
                assert r.status == 200, r.status
            return time.perf_counter() - start

        for url in (direct, routed):  # warm the connection pools
            for _ in range(50):
                await one(url)
        while len(samples["router"]) < total:
            for name, url in (("direct", direct), ("router", routed)):
                for _ in range(block):
                    samples[name].append(await one(url))
    result: dict[str, Any] = {"requests_each": total}
    for name, values in samples.items():
        result[name] = {
            "p50_ms": pct(values, 0.50) * 1e3,
            "p99_ms": pct(values, 0.99) * 1e3,
            "mean_ms": statistics.fmean(values) * 1e3,
        }
    result["added_p50_ms"] = result["router"]["p50_ms"] - result["direct"]["p50_ms"]
    result["added_p99_ms"] = result["router"]["p99_ms"] - result["direct"]["p99_ms"]
    return result


async def throughput(url: str, pid: int, concurrency: int, seconds: float) -> dict[str, Any]:
    import aiohttp

    done = 0
    stop = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < stop:
                async with http.post(url, data=BODY) as r:
                    await r.read()
                    assert r.status == 200
                done += 1

        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cpu1, t1 = cpu_seconds(pid), time.monotonic()
    rps = done / (t1 - t0)
    cores = (cpu1 - cpu0) / (t1 - t0)
    return {
        "concurrency": concurrency,
        "requests": done,
        "rps": rps,
        "router_cores_used": cores,
        "rps_per_core": rps / cores if cores > 0 else float("nan"),
    }


async def open_streams(url: str, pid: int, count: int) -> dict[str, Any]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    rss_before = rss_mib(pid)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        responses: list[aiohttp.ClientResponse] = []

        async def open_one() -> bool:
            response = await http.post(url, data=STREAM_BODY)
            responses.append(response)
            first = await response.content.readany()
            return response.status == 200 and first.startswith(b"data: ")

        start = time.monotonic()
        sem = asyncio.Semaphore(200)  # open them at a bounded rate, hold them all together

        async def gated() -> bool:
            async with sem:
                return await open_one()

        results = await asyncio.gather(*(gated() for _ in range(count)), return_exceptions=True)
        opened_s = time.monotonic() - start
        held = sum(1 for r in results if r is True)
        rss_held = rss_mib(pid)
        for response in responses:
            response.close()
    errors = [repr(r) for r in results if isinstance(r, BaseException)][:3]
    return {
        "requested": count,
        "held": held,
        "open_s": opened_s,
        "router_rss_mib_before": rss_before,
        "router_rss_mib_held": rss_held,
        "errors": errors,
    }


async def scale_from_zero(router_url: str, count: int) -> dict[str, Any]:
    import aiohttp

    latencies = []
    async with aiohttp.ClientSession() as http:
        for index in range(count):
            body = json.dumps({"model": f"cold-{index}", "prompt": "hi", "max_tokens": 1})
            start = time.perf_counter()
            async with http.post(router_url + "/v1/completions", data=body) as r:
                await r.read()
                assert r.status == 200, r.status
            latencies.append(time.perf_counter() - start)
    added = [t - RESTORE_S for t in latencies]
    return {
        "samples": count,
        "restore_s": RESTORE_S,
        "first_token_s": latencies,
        "router_added_median_ms": statistics.median(added) * 1e3,
        "router_added_max_ms": max(added) * 1e3,
    }


# --- driver ----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="latency samples per path")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput run length")
    parser.add_argument("--streams", type=int, default=2000, help="SSE streams held at once")
    parser.add_argument("--cold", type=int, default=5, help="scale-from-zero samples")
    parser.add_argument("--out", type=Path, default=RESULTS / "router.json")
    parser.add_argument("--role", choices=["upstream"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--agent-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "upstream":
        serve_upstream(args.port, args.agent_port)
        return 0

    from fastboot.serve import free_port

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    up_port, agent_port, router_port = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "router.toml"
        config.write_text(
            f'[router]\nport = {router_port}\n\n[models.bench]\nsnapshot = "bench-snapshot"\n'
            f"concurrency = {max(4096, args.streams * 2)}\nqueue_max = 10000\n"
            f"min_replicas = 1\nmax_replicas = 1\n\n"
            + "".join(f'[models.cold-{i}]\nsnapshot = "cold-{i}"\n\n' for i in range(args.cold))
            + f'[[agents]]\nurl = "http://127.0.0.1:{agent_port}"\ntoken = "bench"\n'
        )
        env = {**os.environ, "FASTBOOT_LOG_LEVEL": "WARNING"}
        try:
            upstream = subprocess.Popen(
                [sys.executable, __file__, "--role", "upstream", "--port", str(up_port),
                 "--agent-port", str(agent_port)],
                env=env,
            )  # fmt: skip
            procs.append(upstream)
            wait_http(f"http://127.0.0.1:{up_port}/health", upstream)
            router = subprocess.Popen(
                [sys.executable, "-m", "fastboot", "router", "--config", str(config)], env=env
            )
            procs.append(router)
            wait_http(f"http://127.0.0.1:{router_port}/health", router)
            direct = f"http://127.0.0.1:{up_port}/v1/completions"
            routed = f"http://127.0.0.1:{router_port}/v1/completions"
            results: dict[str, Any] = {
                "upstream": "fast fake engine (fixed small JSON / held SSE), not vLLM",
                "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
                "latency": asyncio.run(latency(direct, routed, args.requests)),
                "throughput": asyncio.run(
                    throughput(routed, router.pid, args.concurrency, args.seconds)
                ),
                "throughput_direct": asyncio.run(
                    throughput(direct, upstream.pid, args.concurrency, args.seconds)
                ),
                "streams": asyncio.run(open_streams(routed, router.pid, args.streams)),
                "scale_from_zero": asyncio.run(
                    scale_from_zero(f"http://127.0.0.1:{router_port}", args.cold)
                ),
            }
        finally:
            for proc in reversed(procs):
                proc.terminate()
            for proc in reversed(procs):
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def report(r: dict[str, Any]) -> None:
    lat, thr, thd, st = r["latency"], r["throughput"], r["throughput_direct"], r["streams"]
    d, v = lat["direct"], lat["router"]
    print(f"upstream: {r['upstream']}; {r['host']['cpus']} CPUs shared by all three processes")
    print(f"{'metric':34} {'direct':>10} {'router':>10} {'added':>9} {'ratio':>7} {'target':>9}")
    for key, target in (("p50_ms", 1.0), ("p99_ms", 5.0)):
        added = v[key] - d[key]
        print(
            f"{'latency ' + key:34} {d[key]:10.3f} {v[key]:10.3f} {added:9.3f} "
            f"{v[key] / d[key]:7.2f} {'<= ' + format(target, 'g') + ' ms':>9}"
        )
    print(
        f"{'requests/s (c=' + str(thr['concurrency']) + ')':34} {thd['rps']:10.0f} "
        f"{thr['rps']:10.0f} {'':9} {thr['rps'] / thd['rps']:7.2f}"
    )
    print(
        f"{'router requests/s per core':34} {'':10} {thr['rps_per_core']:10.0f} {'':9} {'':7} "
        f"{'>= 300':>9}"
    )
    print(
        f"{'SSE streams held open':34} {'':10} {st['held']:10d} {'':9} "
        f"{st['held'] / st['requested']:7.2f} {'>= 2000':>9}"
    )
    print(
        f"{'router RSS MiB (idle -> held)':34} {st['router_rss_mib_before']:10.1f} "
        f"{st['router_rss_mib_held']:10.1f}"
    )
    z = r["scale_from_zero"]
    first = statistics.median(z["first_token_s"])
    print(
        f"{'scale from zero: first token s':34} {z['restore_s']:10.3f} {first:10.3f} "
        f"{z['router_added_median_ms'] / 1e3:9.3f} {first / z['restore_s']:7.2f} "
        f"{'<= 0.1 s':>9}"
    )
    print("  (direct column = the fake agent's restore time alone; median of the samples)")


if __name__ == "__main__":
    sys.exit(main())
