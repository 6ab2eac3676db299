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

Then against the REAL agent (`--only real` runs just these; needs root, CRIU and vLLM): the script
writes the tiny model, takes its own `fastboot snapshot create`, starts `fastboot agent` (own name
and subnet) and a router in front of it, and measures:
  5. scale from zero, real: a fresh router at zero replicas per sample; time from sending a
     streaming request to its first token, against the restore time the agent reports for the
     replica it made (`timings.ready_s`), and against the same request's TTFT on the warm
     replica directly (target: router adds <= 100 ms beyond restore + TTFT);
  6. `vllm bench serve` (vLLM's own load generator, random dataset) once through the router and
     once directly against the same replica: throughput and TTFT/TPOT medians.
Everything it started (router, agent, replicas, namespaces, the snapshot) is gone at the end.

    .venv/bin/python benchmarks/router_bench.py [--requests 2000] [--streams 2000] [--only real]

Results are merged into the JSON file: sections not run keep their numbers from earlier runs.
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


# --- against the real agent -----------------------------------------------------------------

#: The benchmark's agent: its own name (namespaces fb-rb-N, links fbrbhN) and subnet, apart from
#: the agents' default 10.213/16 that another agent on this host may be using.
AGENT_NAME, AGENT_SUBNET = "rb", "10.217.0.0/24"
COLD_BODY = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 8, "stream": True}


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


class RealAgent:
    """`fastboot agent` as a child process, with a small JSON client for its API."""

    def __init__(self, work: Path, snapshots: Path) -> None:
        import secrets

        from fastboot.serve import free_port

        self.token = secrets.token_hex(16)
        token_file = work / "agent.token"
        token_file.write_text(self.token)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = work / "agent.log"
        argv = [sys.executable, "-m", "fastboot", "agent", "--listen", f"127.0.0.1:{port}",
                "--token-file", str(token_file), "--name", AGENT_NAME, "--subnet", AGENT_SUBNET,
                "--snapshot-dir", str(snapshots), "--state-dir", str(work / "agent"),
                "--slots", "1"]  # fmt: skip
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{tail(self.log)}")
            try:
                self.call("GET", "/v1/health", timeout=2)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"agent not healthy in 60 s:\n{tail(self.log)}") from None
                time.sleep(0.1)

    def call(self, method: str, path: str, body: Any = None, timeout: float = 300) -> Any:
        request = urllib.request.Request(
            self.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"null")

    def live(self) -> list[dict[str, Any]]:
        replicas: list[dict[str, Any]] = self.call("GET", "/v1/replicas")["replicas"]
        return [r for r in replicas if r["state"] in ("restoring", "ready")]

    def delete_all(self) -> None:
        for replica in self.live():
            self.call("DELETE", f"/v1/replicas/{replica['id']}")

    def stop(self) -> None:
        """SIGTERM: the agent stops its replicas and removes their namespaces."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


def make_snapshot(work: Path) -> tuple[Path, Path, str, float]:
    """Write the tiny model and `fastboot snapshot create` it: (model, snapshot dir, id, s)."""
    from fastboot.models.tiny import cpu_serve_flags, write_tiny_llama

    model = write_tiny_llama(work / "tiny", "tiny")
    flags = cpu_serve_flags()
    at = flags.index("--host")  # an isolated engine listens on 0.0.0.0 in its own netns
    flags = flags[:at] + flags[at + 2 :]
    snapshots, log = work / "snapshots", work / "create.log"
    argv = [sys.executable, "-m", "fastboot", "snapshot", "--dir", str(snapshots), "create"]
    start = time.monotonic()
    with log.open("wb") as err:
        done = subprocess.run(
            [*argv, str(model), *flags], stdout=subprocess.PIPE, stderr=err, timeout=1800
        )
    if done.returncode != 0:
        raise RuntimeError(f"snapshot create failed ({done.returncode}):\n{tail(log)}")
    return model, snapshots, done.stdout.decode().split()[-1], time.monotonic() - start


def start_router(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        router = subprocess.Popen(
            [sys.executable, "-m", "fastboot", "router", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "FASTBOOT_LOG_LEVEL": "INFO"},
        )
    return router


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def first_token(base: str, model: str) -> float:
    """Seconds from sending a small streaming completion to its first token (read to the end)."""
    import aiohttp

    first = None
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        start = time.perf_counter()
        async with http.post(base + "/v1/completions", json={**COLD_BODY, "model": model}) as r:
            assert r.status == 200, (r.status, await r.text())
            async for line in r.content:
                if first is None and line.startswith(b"data: {"):
                    assert b'"error"' not in line, line
                    first = time.perf_counter() - start
    assert first is not None, "the stream had no token"
    return first


def router_metric(url: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return float("nan")


def vllm_bench(base: str, model: Path, served: str, out: Path, args: argparse.Namespace) -> Any:
    """One `vllm bench serve` run; its result JSON."""
    vllm = Path(sys.executable).parent / "vllm"
    argv = [str(vllm), "bench", "serve", "--backend", "vllm", "--base-url", base,
            "--model", str(model), "--served-model-name", served, "--tokenizer", str(model),
            "--dataset-name", "random", "--random-input-len", str(args.bench_input_len),
            "--random-output-len", str(args.bench_output_len), "--ignore-eos",
            "--num-prompts", str(args.bench_prompts), "--max-concurrency", "4",
            "--num-warmups", "4", "--seed", "0", "--disable-tqdm", "--save-result",
            "--result-dir", str(out.parent), "--result-filename", out.name]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    log = out.with_suffix(".log")
    with log.open("wb") as sink:
        done = subprocess.run(argv, stdout=sink, stderr=subprocess.STDOUT, env=env, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({done.returncode}):\n{tail(log)}")
    return json.loads(out.read_text())


BENCH_KEYS = ("completed", "failed", "duration", "request_throughput", "output_throughput",
              "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms",
              "median_itl_ms")  # fmt: skip


def real_agent(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Sections 5 and 6: a real snapshot, agent, replicas and routers; all stopped at the end."""
    from fastboot.host import netns
    from fastboot.serve import free_port

    model, snapshots, snapshot_id, create_s = make_snapshot(work)
    print(f"snapshot {snapshot_id} created in {create_s:.1f} s", flush=True)
    agent = RealAgent(work, snapshots)
    router: subprocess.Popen[bytes] | None = None
    try:
        (listed,) = agent.call("GET", "/v1/snapshots")["snapshots"]
        served = listed["served_model_name"]
        # One restore first, not measured: the agent's first POST hashes the snapshot's files
        # (later ones trust its digest cache) and the first restore reads the images from disk.
        (warm,) = agent.call("POST", "/v1/replicas", {"snapshot": snapshot_id})["replicas"]
        agent.call("GET", f"/v1/replicas/{warm['id']}?wait=ready&timeout=300")
        agent.delete_all()
        port = free_port()
        config = work / "router.toml"
        config.write_text(
            f"[router]\nport = {port}\n\n[models.tiny]\n"
            f'snapshot = "{snapshot_id}"\nserved_model_name = {json.dumps(served)}\n'
            "concurrency = 4\nscale_down_delay_s = 3600\n\n"
            f'[[agents]]\nurl = "{agent.url}"\ntoken = "{agent.token}"\n'
        )
        url = f"http://127.0.0.1:{port}"
        samples = []
        for index in range(args.real_cold):
            if router is not None:
                stop(router)
            agent.delete_all()  # a fresh router at zero replicas: nothing to adopt
            router = start_router(config, work / "router.log")
            wait_http(url + "/health", router)
            through_router = asyncio.run(first_token(url, "tiny"))
            (replica,) = agent.live()
            direct = [asyncio.run(first_token(replica["address"], served)) for _ in range(5)]
            sample = {
                "first_token_s": through_router,
                "replica_ready_s": replica["timings"]["ready_s"],
                "replica_restore_s": replica["timings"]["restore_s"],
                "warm_ttft_s": statistics.median(direct),
                "router_place_s": router_metric(
                    url, "router_replica_boot_seconds_sum", phase="place"
                ),
                "router_boot_total_s": router_metric(
                    url, "router_replica_boot_seconds_sum", phase="total"
                ),
                "router_cold_start_metric_s": router_metric(url, "router_cold_start_seconds_sum"),
            }
            sample["router_added_s"] = (
                through_router - sample["replica_ready_s"] - sample["warm_ttft_s"]
            )
            print(f"cold sample {index}: {json.dumps(sample)}", flush=True)
            samples.append(sample)
        cold = {
            "samples": samples,
            **{
                f"median_{key}": statistics.median(s[key] for s in samples)
                for key in ("first_token_s", "replica_ready_s", "warm_ttft_s", "router_added_s")
            },
            "max_router_added_s": max(s["router_added_s"] for s in samples),
        }
        # The last sample's router and replica serve the load generator.
        (replica,) = agent.live()
        runs = {}
        for name, base in (("direct", replica["address"]), ("router", url)):
            result = vllm_bench(base, model, served if name == "direct" else "tiny",
                                work / f"bench-{name}.json", args)  # fmt: skip
            runs[name] = {key: result.get(key) for key in BENCH_KEYS}
            print(f"vllm bench serve {name}: {json.dumps(runs[name])}", flush=True)
        d, v = runs["direct"], runs["router"]
        runs["difference"] = {
            "request_throughput_ratio": v["request_throughput"] / d["request_throughput"],
            "output_throughput_ratio": v["output_throughput"] / d["output_throughput"],
            "median_ttft_added_ms": v["median_ttft_ms"] - d["median_ttft_ms"],
            "median_tpot_added_ms": v["median_tpot_ms"] - d["median_tpot_ms"],
        }
        runs["settings"] = {
            "backend": "vllm",
            "dataset": "random",
            "input_len": args.bench_input_len,
            "output_len": args.bench_output_len,
            "num_prompts": args.bench_prompts,
            "max_concurrency": 4,
            "num_warmups": 4,
            "ignore_eos": True,
        }
    finally:
        if router is not None:
            stop(router)
        agent.stop()
    left = netns.ours(f"fb-{AGENT_NAME}-") + netns.host_links(f"fb{AGENT_NAME}h")
    if left:
        raise RuntimeError(f"the agent left {left}; log:\n{tail(agent.log)}")
    return {
        "real_agent": {
            "engine": f"vllm {listed['engine_version']} (CPU), tiny model, one replica",
            "snapshot_create_s": create_s,
            "snapshot_bytes": listed["size_bytes"],
        },
        "scale_from_zero_real": cold,
        "vllm_bench_serve": runs,
    }


# --- driver ----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="latency samples per path")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput run length")
    parser.add_argument("--streams", type=int, default=2000, help="SSE streams held at once")
    parser.add_argument("--cold", type=int, default=5, help="scale-from-zero samples (fake)")
    parser.add_argument("--real-cold", type=int, default=3, help="scale-from-zero samples (real)")
    parser.add_argument("--bench-prompts", type=int, default=50, help="vllm bench --num-prompts")
    parser.add_argument("--bench-input-len", type=int, default=32)
    parser.add_argument("--bench-output-len", type=int, default=32)
    parser.add_argument(
        "--only", choices=["fake", "real"], help="run only the fake-upstream or real-agent part"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "router.json")
    parser.add_argument("--role", choices=["upstream"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--agent-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "upstream":
        serve_upstream(args.port, args.agent_port)
        return 0

    results: dict[str, Any] = {}
    if args.only != "real":
        results.update(fake_upstream(args))
    if args.only != "fake":
        with tempfile.TemporaryDirectory(prefix="router-bench-") as tmp:
            results.update(real_agent(args, Path(tmp)))
    report(results)
    merged = json.loads(args.out.read_text()) if args.out.exists() else {}
    merged.update(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"wrote {args.out} (sections {', '.join(results)})")
    return 0


def fake_upstream(args: argparse.Namespace) -> dict[str, Any]:
    """Sections 1-4: the router before a fast fake engine and a fake agent."""
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
            return {
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


def report(r: dict[str, Any]) -> None:
    """The table of the sections this run measured, each with its baseline and ratio."""
    if "latency" in r:
        report_fake(r)
    if "vllm_bench_serve" in r:
        report_real(r)


def report_fake(r: dict[str, Any]) -> None:
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


def report_real(r: dict[str, Any]) -> None:
    z, b = r["scale_from_zero_real"], r["vllm_bench_serve"]
    d, v, diff = b["direct"], b["router"], b["difference"]
    print(f"\nreal agent: {r['real_agent']['engine']}; same host, {os.cpu_count()} CPUs")
    print(f"{'metric':34} {'baseline':>10} {'router':>10} {'added':>9} {'ratio':>7} {'target':>9}")
    base = z["median_replica_ready_s"] + z["median_warm_ttft_s"]
    first = z["median_first_token_s"]
    print(
        f"{'scale from zero: first token s':34} {base:10.3f} {first:10.3f} "
        f"{z['median_router_added_s']:9.3f} {first / base:7.2f} {'<= 0.1 s':>9}"
    )
    print(
        f"  (baseline = the agent's restore-to-ready {z['median_replica_ready_s']:.3f} s + the "
        f"warm replica's TTFT {z['median_warm_ttft_s']:.3f} s; median of {len(z['samples'])}; "
        f"worst added {z['max_router_added_s']:.3f} s)"
    )
    for key, label in (
        ("request_throughput", "vllm bench: requests/s"),
        ("output_throughput", "vllm bench: output tokens/s"),
        ("median_ttft_ms", "vllm bench: median TTFT ms"),
        ("median_tpot_ms", "vllm bench: median TPOT ms"),
        ("p99_ttft_ms", "vllm bench: p99 TTFT ms"),
    ):
        print(
            f"{label:34} {d[key]:10.2f} {v[key]:10.2f} {v[key] - d[key]:9.2f} "
            f"{v[key] / d[key]:7.2f}"
        )
    print(
        f"  (baseline = the same replica directly; {b['settings']['num_prompts']} prompts each, "
        f"failed: direct {d['failed']}, router {v['failed']}; TTFT change "
        f"{diff['median_ttft_added_ms']:+.2f} ms)"
    )


if __name__ == "__main__":
    sys.exit(main())
