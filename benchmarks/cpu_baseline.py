"""What a CPU ceiling costs: `--fastboot-cpu-baseline` levels against `native`, same run.

For each engine and level, one `fastboot serve` cold boot makes the level's snapshot (its time
and size recorded), then N rounds, interleaved across levels, each: a restore timed from
process start to fastboot's "restored snapshot" line and the first completed request, then
decode throughput on the restored engine: one greedy stream of DECODE_TOKENS tokens (tokens/s)
and, for vLLM, BATCH concurrent ones (aggregate tokens/s; the torch server answers one
request at a time).

- vLLM (CPU build) at native and x86-64-v3: the lowest level it has kernels for (`_C_AVX2`;
  v2 is refused). Sizes tiny and 1gib (fastboot model tiny).
- A torch server at native, x86-64-v3 and x86-64-v2: tests/gpu/gpu_server.py (transformers on
  torch, the stdlib HTTP server) on the 1gib model, run as `--fastboot-engine command`, the
  engine that shows what torch's own kernels (ATen, oneDNN, OpenBLAS) cost below AVX2.

Prints a table of medians with each level's ratio to native and writes
benchmarks/results/cpu_baseline.json.

    .venv/bin/python benchmarks/cpu_baseline.py [--runs 3] [--sizes tiny,1gib]
        [--torch-size 1gib] [--torch-levels native,x86-64-v3,x86-64-v2]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from boot_latency import timed_boot  # noqa: E402

from fastboot.models.tiny import cpu_serve_flags, write_tiny_llama  # noqa: E402
from fastboot.serve import free_port  # noqa: E402
from fastboot.snapshot import cpu_levels, fingerprint  # noqa: E402
from fastboot.snapshot.store import Store  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DECODE_TOKENS = 128
BATCH = 8
READY = "restored snapshot"


def complete(port: int, body: dict[str, object]) -> tuple[int, float]:
    """(tokens generated, seconds) for one completion."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        json.dumps(body).encode(),
        {"content-type": "application/json"},
    )
    start = time.monotonic()
    with urllib.request.urlopen(request, timeout=600) as response:
        doc = json.loads(response.read())
    elapsed = time.monotonic() - start
    usage = doc.get("usage") or {}
    tokens = usage.get("completion_tokens") or len(doc["choices"][0].get("token_ids") or [])
    return int(tokens), elapsed


def throughput(port: int, model: str, batch: int) -> dict[str, float]:
    """Single-stream and batch-stream decode tokens/s (greedy, EOS ignored where the server
    knows the option); batch 0: single only."""
    body = {
        "model": model,
        "prompt": "the quick brown fox",
        "max_tokens": DECODE_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }
    complete(port, {**body, "max_tokens": 4})  # first request after a restore: not decode
    tokens, seconds = complete(port, body)
    rates = {"single_tokens_per_s": tokens / seconds}
    if batch:
        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(batch) as pool:
            done = list(pool.map(lambda _: complete(port, body), range(batch)))
        rates["batch_tokens_per_s"] = sum(t for t, _ in done) / (time.monotonic() - start)
    return rates


class Level:
    """One engine at one level: its snapshot, restores and throughput."""

    def __init__(
        self, engine: str, level: str, argv: list[str], model: str, work: Path, batch: int
    ) -> None:
        self.engine, self.level, self.model, self.batch = engine, level, model, batch
        self.port = free_port()
        self.snapshots = work / f"snapshots-{engine}-{level}"
        self.log = work / f"{engine}-{level}.log"
        # fastboot's flags right after MODEL: a command engine's own start after `--`.
        own = ["--fastboot-snapshot-dir", str(self.snapshots), "--fastboot-cpu-baseline", level]
        full = [sys.executable, "-m", "fastboot", "serve", argv[0], *own, *argv[1:]]
        self.argv = [a.replace("{PORT}", str(self.port)) for a in full]
        self.restore_s: list[float] = []
        self.rates: list[dict[str, float]] = []
        self.cold: dict[str, object] = {}

    def make_snapshot(self) -> None:
        start = time.monotonic()
        timed_boot(self.argv, self.port, self.model, self.log, signal.SIGINT, self.snapshots)
        (manifest,) = Store(self.snapshots).list()
        assert not isinstance(manifest, Exception), manifest
        self.cold = {
            "first_run_s": time.monotonic() - start,
            "cold_boot_s": manifest.cold_boot_s,
            "dump_s": manifest.dump_s,
            "snapshot_bytes": manifest.total_bytes,
            "recorded_cpu_flags": len(manifest.fingerprint.cpu_flags),
        }

    def round(self) -> None:
        """One restore, timed, then throughput measured on the restored engine."""
        rates: dict[str, float] = {}

        def measure() -> None:
            rates.update(throughput(self.port, self.model, self.batch))

        seconds = timed_boot(
            self.argv, self.port, self.model, self.log, signal.SIGINT, None, READY,
            after=measure,
        )  # fmt: skip
        self.restore_s.append(seconds)
        self.rates.append(rates)

    def summary(self) -> dict[str, object]:
        def median(key: str) -> float | None:
            values = [r[key] for r in self.rates if key in r]
            return statistics.median(values) if values else None

        return {
            "engine": self.engine,
            "level": self.level,
            **self.cold,
            "restore_s": self.restore_s,
            "restore_median_s": statistics.median(self.restore_s),
            "throughput": self.rates,
            "single_tokens_per_s_median": median("single_tokens_per_s"),
            "batch_tokens_per_s_median": median("batch_tokens_per_s"),
        }


def vllm_levels(size: str, work: Path) -> list[Level]:
    model = work / f"model-{size}"
    if not model.exists():
        write_tiny_llama(model, size)
    argv = [str(model), "--port", "{PORT}", *cpu_serve_flags(size)]
    return [
        Level(f"vllm-{size}", lv, argv, str(model), work, BATCH) for lv in ("native", "x86-64-v3")
    ]


def torch_levels(size: str, levels: list[str], work: Path) -> list[Level]:
    model = work / f"model-{size}"
    if not model.exists():
        write_tiny_llama(model, size)
    server = [sys.executable, str(ROOT / "tests" / "gpu" / "gpu_server.py"), "--model", "{model}"]
    server += ["--host", "{host}", "--port", "{port}", "--device", "cpu"]
    argv = [str(model), "--fastboot-engine", "command", "--port", "{PORT}"]
    argv += ["--fastboot-ready-path", "/health", "--", *server]
    return [Level(f"torch-{size}", lv, argv, str(model), work, 0) for lv in levels]


def table(results: list[dict[str, object]]) -> str:
    native = {r["engine"]: r for r in results if r["level"] == "native"}
    lines = [
        f"{'engine':<12} {'level':<10} {'restore s':>9} {'1-stream tok/s':>14} "
        f"{'x native':>8} {f'{BATCH}-stream tok/s':>14} {'x native':>8}"
    ]

    def cells(value: object, base: object) -> str:
        if not isinstance(value, float) or not isinstance(base, float):
            return f"{'-':>14} {'-':>8}"
        return f"{value:>14.1f} {value / base:>8.2f}"

    for r in results:
        base = native[r["engine"]]
        single = cells(r["single_tokens_per_s_median"], base["single_tokens_per_s_median"])
        batch = cells(r["batch_tokens_per_s_median"], base["batch_tokens_per_s_median"])
        lines.append(
            f"{r['engine']:<12} {r['level']:<10} {r['restore_median_s']:>9.2f} {single} {batch}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sizes", default="tiny,1gib", help="vLLM model sizes ('' : none)")
    parser.add_argument("--torch-size", default="1gib", help="'' : no torch server")
    parser.add_argument("--torch-levels", default="native,x86-64-v3,x86-64-v2")
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu_baseline.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fastboot-bench-cpu-") as tmp:
        work = Path(tmp)
        levels = [
            lv for size in filter(None, args.sizes.split(",")) for lv in vllm_levels(size, work)
        ]
        if args.torch_size:
            levels += torch_levels(args.torch_size, args.torch_levels.split(","), work)
        for level in levels:
            print(f"[{level.engine} {level.level}] making the snapshot", flush=True)
            level.make_snapshot()
        for i in range(args.runs):
            for level in levels:
                level.round()
                print(
                    f"[{level.engine} {level.level}] run {i + 1}/{args.runs}: restore "
                    f"{level.restore_s[-1]:.2f} s, {level.rates[-1]}",
                    flush=True,
                )
        results = [level.summary() for level in levels]
    _, flags = fingerprint.cpu_info()
    doc = {
        "benchmark": "cpu_baseline",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {
            "cpu": fingerprint.cpu_info()[0],
            "level": cpu_levels.highest_level(flags),
            "cores": len(os.sched_getaffinity(0)),
            "kernel": platform.release(),
        },
        "runs": args.runs,
        "decode_tokens": DECODE_TOKENS,
        "batch": BATCH,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(results))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
