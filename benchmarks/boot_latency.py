"""Boot latency: plain `vllm serve` (cold, compile cache warm) vs `fastboot serve` (restore).

For each model size, in one run:
  1. one plain `vllm serve` boot, unmeasured, so the torch.compile cache is warm (the fair
     baseline: a real fleet keeps its compile cache);
  2. one `fastboot serve` cold boot that makes the snapshot (dump time, image size);
  3. N interleaved triples, each timed from process start to the first completed request:
     plain `vllm serve`; `fastboot serve` restoring with the page images mapped copy-on-write
     (fastboot's CRIU patch, the default); and `fastboot serve` restoring with every page copied
     (FASTBOOT_COPY_PAGES=1, what upstream CRIU does). Without the patch the last two are alike;
  4. two floors for a restore that copies, from the page cache: reading the snapshot's bytes into
     one reused buffer (what `cat > /dev/null` does), and loading them into fresh anonymous
     memory (every page allocated, zeroed and filled). A mapped restore is not bound by them.
     fastboot's own phases (verify, `criu restore`, first answer) come from its DEBUG log.

Then, for servers fastboot runs as `--fastboot-engine command` (the tiny model: llama.cpp's
`python -m llama_cpp.server` on its GGUF, and `transformers serve` on its directory): N
interleaved pairs of the plain server's cold boot and `fastboot serve --fastboot-engine command`
restoring, each timed from process start to the first completed request (after one unmeasured
first run that makes the snapshot).

Prints tables with medians and ratios and writes JSON (and a PNG chart) to benchmarks/results/.

    .venv/bin/python benchmarks/boot_latency.py [--sizes tiny,1gib] [--runs 3]
        [--servers llama.cpp,transformers]   ("" : vLLM only)
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from fastboot.models.tiny import cpu_serve_flags, write_tiny_llama
from fastboot.serve import free_port
from fastboot.snapshot.store import Store

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def first_completion(
    port: int, model: str, proc: subprocess.Popen[bytes], deadline_s: float
) -> None:
    body = json.dumps({"model": model, "prompt": "hello", "max_tokens": 4, "temperature": 0})
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=body.encode(),
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.05)
    raise RuntimeError(f"no completion within {deadline_s} s")


def timed_boot(
    argv: list[str],
    port: int,
    model: str,
    log: Path,
    stop: signal.Signals,
    snapshots: Path | None = None,
    ready_line: str | None = None,
    extra_env: dict[str, str] | None = None,
    after: Callable[[], None] | None = None,
) -> float:
    """Seconds from process start to the first completed request; the process is then stopped.

    With snapshots: first wait until a snapshot is published there (a first `fastboot serve`
    answers from its cold engine while it warms up and dumps). With ready_line: also until the
    log has that line — a restored engine's socket answers as soon as `criu restore` returns,
    and fastboot's restore is complete only once it has checked the oracle and said so.
    after: called on the ready server (not timed) before it is stopped."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FASTBOOT_LOG_LEVEL": "DEBUG", **(extra_env or {})}
    offset = log.stat().st_size if log.exists() else 0
    with log.open("ab") as out:
        start = time.monotonic()
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            while snapshots is not None and not Store(snapshots).list():
                if proc.poll() is not None or time.monotonic() - start > 900:
                    raise RuntimeError("no snapshot was published")
                time.sleep(0.5)
            first_completion(port, model, proc, 900)
            while ready_line is not None and ready_line not in log_since(log, offset):
                if proc.poll() is not None or time.monotonic() - start > 900:
                    raise RuntimeError(f"no {ready_line!r} in the log")
                time.sleep(0.005)
            seconds = time.monotonic() - start
            if after is not None:
                after()
            return seconds
        except RuntimeError as exc:
            tail = log.read_text(errors="replace").splitlines()[-30:]
            raise RuntimeError(
                f"{' '.join(argv[:3])}...: {exc}; log tail:\n" + "\n".join(tail)
            ) from exc
        finally:
            proc.send_signal(stop)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def log_since(log: Path, offset: int) -> str:
    with log.open(errors="replace") as f:
        f.seek(offset)
        return f.read()


def page_cache_read_s(path: Path) -> float:
    """Seconds to read every file under path, after one read to make it page-cache resident."""
    files = [p for p in path.rglob("*") if p.is_file()]
    for _ in range(2):
        start = time.monotonic()
        for file in files:
            with file.open("rb", buffering=0) as f:
                while f.read(8 << 20):
                    pass
        elapsed = time.monotonic() - start
    return elapsed


def memory_load_s(path: Path) -> float:
    """Seconds to load every file under path into fresh anonymous memory (page-cache resident:
    run after page_cache_read_s). This is the work a restore cannot skip: each page of the
    image is allocated, zeroed by the kernel and filled, as CRIU does for the restored process."""
    files = [p for p in path.rglob("*") if p.is_file() and p.stat().st_size]
    start = time.monotonic()
    maps = []
    for file in files:
        size = file.stat().st_size
        memory = mmap.mmap(-1, size)
        view = memoryview(memory)
        with file.open("rb", buffering=0) as f:
            offset = 0
            while offset < size:
                offset += f.readinto(view[offset : offset + (8 << 20)]) or size
        maps.append((memory, view))
    elapsed = time.monotonic() - start
    for memory, view in maps:
        view.release()
        memory.close()
    return elapsed


#: fastboot's DEBUG lines for the phases of a restore.
PHASES = {
    "verify_s": re.compile(r"verified \d+ files in ([\d.]+) s"),
    "criu_restore_s": re.compile(r"criu restore took ([\d.]+) s"),
    "answer_s": re.compile(r"restored engine answered in ([\d.]+) s"),
    "oracle_s": re.compile(r"oracle matched in ([\d.]+) s"),
    "restore_total_s": re.compile(r"restored snapshot \w+ in ([\d.]+) s"),
}


def restore_phases(log_text: str) -> dict[str, float]:
    """The last restore's phases in a fastboot log."""
    phases = {}
    for name, pattern in PHASES.items():
        found = pattern.findall(log_text)
        if found:
            phases[name] = float(found[-1])
    return phases


def bench_size(size: str, runs: int, work: Path) -> dict[str, object]:
    model = work / f"model-{size}"
    if not model.exists():
        write_tiny_llama(model, size)
    port = free_port()
    vllm = str(Path(sys.executable).with_name("vllm"))
    snapshots = work / f"snapshots-{size}"
    # The KV cache is sized to the need, so the image holds no cache worth rebuilding.
    flags = cpu_serve_flags(size)
    plain = [vllm, "serve", str(model), "--port", str(port), *flags]
    # Plain vLLM's ZMQ ipc sockets go to the work dir (its default, /tmp, keeps them).
    rpc_dir = work / "rpc"
    rpc_dir.mkdir(exist_ok=True)
    plain_env = {"VLLM_RPC_BASE_PATH": str(rpc_dir)}
    fastboot = [
        sys.executable,
        "-m",
        "fastboot",
        "serve",
        str(model),
        "--port",
        str(port),
        *flags,
        "--fastboot-snapshot-dir",
        str(snapshots),
    ]
    log = work / f"{size}.log"
    print(f"[{size}] warming the compile cache with one plain boot", flush=True)
    timed_boot(plain, port, str(model), log, signal.SIGTERM, extra_env=plain_env)
    print(f"[{size}] making the snapshot (fastboot cold boot)", flush=True)
    first_s = timed_boot(fastboot, port, str(model), log, signal.SIGINT, snapshots)
    (manifest,) = Store(snapshots).list()
    assert not isinstance(manifest, Exception), manifest
    baseline, restore, copied, phases, copied_phases = [], [], [], [], []
    ready = "restored snapshot"
    for i in range(runs):
        baseline.append(
            timed_boot(plain, port, str(model), log, signal.SIGTERM, extra_env=plain_env)
        )
        for times, phase_list, env in (
            (restore, phases, {"FASTBOOT_COPY_PAGES": "0"}),
            (copied, copied_phases, {"FASTBOOT_COPY_PAGES": "1"}),
        ):
            offset = log.stat().st_size
            times.append(
                timed_boot(fastboot, port, str(model), log, signal.SIGINT, None, ready, env)
            )
            with log.open(errors="replace") as f:
                f.seek(offset)
                phase_list.append(restore_phases(f.read()))
        print(
            f"[{size}] run {i + 1}/{runs}: vllm serve {baseline[-1]:.1f} s, "
            f"fastboot restore {restore[-1]:.2f} s {phases[-1]}, "
            f"copying pages {copied[-1]:.2f} s {copied_phases[-1]}",
            flush=True,
        )
    read_s = page_cache_read_s(snapshots / manifest.id)
    load_s = statistics.median(memory_load_s(snapshots / manifest.id) for _ in range(3))
    phase_medians = {
        name: statistics.median(p[name] for p in phases if name in p)
        for name in PHASES
        if any(name in p for p in phases)
    }
    criu_s = phase_medians.get("criu_restore_s", float("nan"))
    return {
        "engine": "vllm",
        "size": size,
        "model_bytes": sum(p.stat().st_size for p in model.iterdir()),
        "vllm_serve_s": baseline,
        "fastboot_restore_s": restore,
        "fastboot_first_run_s": first_s,
        "vllm_serve_median_s": statistics.median(baseline),
        "fastboot_restore_median_s": statistics.median(restore),
        "speedup": statistics.median(baseline) / statistics.median(restore),
        "fastboot_copied_restore_s": copied,
        "fastboot_copied_restore_median_s": statistics.median(copied),
        "copied_restore_phases": copied_phases,
        "mapped_vs_copied": statistics.median(copied) / statistics.median(restore),
        "snapshot_bytes": manifest.total_bytes,
        "dump_s": manifest.dump_s,
        "page_cache_read_s": read_s,
        "memory_load_s": load_s,
        "restore_phases": phases,
        "restore_phase_medians_s": phase_medians,
        "criu_restore_median_s": criu_s,
        "restore_over_read": statistics.median(restore) / read_s,
        "restore_over_load": statistics.median(restore) / load_s,
        "criu_restore_over_load": criu_s / load_s,
    }


def command_servers(work: Path) -> dict[str, tuple[str, list[str], list[str], dict[str, str]]]:
    """name -> (MODEL, server command with {host}/{port}/{model}, fastboot flags, env)."""
    from fastboot.models.gguf_export import GGUF_FILE, write_gguf

    model = work / "model-tiny"
    if not model.exists():
        write_tiny_llama(model, "tiny")
    gguf = work / "gguf" / GGUF_FILE
    if not gguf.exists():
        write_gguf(model, gguf)
    hub = work / "hub-cache"  # transformers serve lists the hub cache: an empty one
    hub.mkdir(exist_ok=True)
    listen = ["--host", "{host}", "--port", "{port}"]
    llama_flags = ["--n_ctx", "512"]
    transformers = str(Path(sys.executable).with_name("transformers"))
    return {
        "llama.cpp": (
            str(gguf),
            [sys.executable, "-m", "llama_cpp.server", "--model", "{model}", *listen, *llama_flags],
            [],
            {},
        ),
        "transformers": (
            str(model),
            [transformers, "serve", "{model}", *listen, "--device", "cpu"],
            ["--fastboot-ready-path", "/health"],
            {"HF_HUB_CACHE": str(hub)},
        ),
    }


def bench_command(name: str, runs: int, work: Path) -> dict[str, object]:
    """The plain server's cold boot vs `fastboot serve --fastboot-engine command` restoring."""
    model, command, flags, env = command_servers(work)[name]
    port = free_port()
    fill = {"{host}": "127.0.0.1", "{port}": str(port), "{model}": model}
    plain = [fill.get(a, a) for a in command]
    snapshots = work / f"snapshots-{name}"
    fastboot = [sys.executable, "-m", "fastboot", "serve", model, "--fastboot-engine", "command"]
    fastboot += ["--port", str(port), *flags, "--fastboot-snapshot-dir", str(snapshots)]
    fastboot += ["--", *command]
    log = work / f"{name}.log"
    print(f"[{name}] making the snapshot (fastboot cold boot)", flush=True)
    timed_boot(fastboot, port, model, log, signal.SIGINT, snapshots, extra_env=env)
    (manifest,) = Store(snapshots).list()
    assert not isinstance(manifest, Exception), manifest
    baseline, restore = [], []
    for i in range(runs):
        baseline.append(timed_boot(plain, port, model, log, signal.SIGTERM, extra_env=env))
        restore.append(
            timed_boot(fastboot, port, model, log, signal.SIGINT, None, "restored snapshot", env)
        )
        print(
            f"[{name}] run {i + 1}/{runs}: plain {baseline[-1]:.2f} s, "
            f"fastboot restore {restore[-1]:.2f} s",
            flush=True,
        )
    return {
        "engine": name,
        "size": "tiny",
        "server_command": command,
        "fastboot_flags": flags,
        "plain_cold_s": baseline,
        "fastboot_restore_s": restore,
        "plain_cold_median_s": statistics.median(baseline),
        "fastboot_restore_median_s": statistics.median(restore),
        "speedup": statistics.median(baseline) / statistics.median(restore),
        "snapshot_bytes": manifest.total_bytes,
        "dump_s": manifest.dump_s,
        "oracle_compares": manifest.oracle.get("compare"),
    }


def plot(results: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [f"{r.get('engine', 'vllm')} {r['size']}" for r in results]
    x = range(len(sizes))
    fig, ax = plt.subplots(figsize=(7, 4))
    base = [float(str(r.get("vllm_serve_median_s", r.get("plain_cold_median_s")))) for r in results]
    fast = [float(str(r["fastboot_restore_median_s"])) for r in results]
    ax.bar(
        [i - 0.2 for i in x], base, 0.4, label="the plain server (cold; vLLM's compile cache warm)"
    )
    ax.bar([i + 0.2 for i in x], fast, 0.4, label="fastboot serve (restore)")
    for i, r in enumerate(results):
        ax.annotate(
            f"{float(str(r['speedup'])):.0f}x", (i + 0.2, fast[i]), ha="center", va="bottom"
        )
    ax.set_xticks(list(x), sizes)
    ax.set_ylabel("seconds to first completed request (median)")
    ax.set_title("Boot latency on CPU")
    ax.set_yscale("log")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,1gib")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--servers", default="llama.cpp,transformers")
    parser.add_argument("--out", type=Path, default=RESULTS / "boot_latency.json")
    parser.add_argument("--plot-only", action="store_true", help="re-draw the PNG from --out")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(args.out.read_text())["results"], args.out.with_suffix(".png"))
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="fastboot-bench-") as work:
        for size in [s for s in args.sizes.split(",") if s]:
            results.append(bench_size(size, args.runs, Path(work)))
        for name in [s for s in args.servers.split(",") if s]:
            results.append(bench_command(name, args.runs, Path(work)))
    print()
    print(
        f"{'model':<6} {'vllm serve':>11} {'fastboot':>9} {'speedup':>8} {'copying':>8} "
        f"{'mapped/copying':>15} {'snapshot':>9} "
        f"{'dump':>6} {'read':>6} {'load':>6} {'criu':>6} {'restore/read':>13} "
        f"{'restore/load':>13} {'criu/load':>10}"
    )
    for r in results:
        if r["engine"] != "vllm":
            continue
        gigabytes = int(str(r["snapshot_bytes"])) / 1e9
        print(
            f"{r['size']:<6} {r['vllm_serve_median_s']:>10.1f}s "
            f"{r['fastboot_restore_median_s']:>8.2f}s {r['speedup']:>7.1f}x "
            f"{r['fastboot_copied_restore_median_s']:>7.2f}s {r['mapped_vs_copied']:>14.1f}x "
            f"{gigabytes:>7.2f}GB "
            f"{r['dump_s']:>5.1f}s {r['page_cache_read_s']:>5.2f}s {r['memory_load_s']:>5.2f}s "
            f"{r['criu_restore_median_s']:>5.2f}s {r['restore_over_read']:>12.1f}x "
            f"{r['restore_over_load']:>12.1f}x "
            f"{r['criu_restore_over_load']:>9.2f}x"
        )
    commands = [r for r in results if r["engine"] != "vllm"]
    if commands:
        print(
            f"\n{'server':<13} {'plain cold':>11} {'fastboot':>9} {'speedup':>8} "
            f"{'snapshot':>9} oracle"
        )
        for r in commands:
            print(
                f"{r['engine']:<13} {r['plain_cold_median_s']:>10.2f}s "
                f"{r['fastboot_restore_median_s']:>8.2f}s {r['speedup']:>7.1f}x "
                f"{int(str(r['snapshot_bytes'])) / 1e9:>7.2f}GB {r['oracle_compares']}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": "boot_latency",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "machine": platform.machine(),
        },
        "engine_flags": {size: cpu_serve_flags(size) for size in args.sizes.split(",") if size},
        "runs": args.runs,
        "results": results,
    }
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
