"""ImageFS against local disk, in one run, with the baseline beside each number.

  1. index: load time of a real 100k-file image's index (target < 100 ms), and mount-to-ready;
  2. sequential read of a 1 GiB file: local disk (cold via fadvise, and page cache) vs the mount:
     cold from nginx on loopback (target >= 1 GB/s; median of 5 fresh mounts with an empty
     SSD cache, the served pack in the server's page cache), then warm (page cache; target
     >= 0.9x local) once the file is kept for FUSE passthrough; without passthrough: cold from
     nginx caching every chunk, from the SSD chunk cache, and warm (the FUSE page cache); warm
     reads alternate with local ones, medians of 7;
  3. fio: random 4k and sequential 1M reads on the mount vs the local file (both warm);
  4. dedup: two model variants that share most tensors, stored bytes vs logical bytes;
  5. `import torch` from a venv image: local vs cold (empty SSD cache, nginx remote), with the
     recorded prefetch, and warm; bytes fetched vs image size.

Prints a table and writes benchmarks/results/imagefs.json and imagefs.png.

    .venv/bin/python benchmarks/imagefs_bench.py [--skip-torch] [--files 100000]

With --snapshot it measures only snapshots stored as images (tiny model, real vLLM and CRIU):
`fastboot serve`'s restore from the local snapshot directory (page cache cold and warm) vs from
the snapshot's image mounted in its place (cold from nginx, then warm), and `fastboot image
unpack-snapshot` from nginx followed by a local restore; it writes imagefs_snapshot.json/.png.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fastboot.imagefs import metrics as fbmetrics
from fastboot.imagefs.build import build
from fastboot.imagefs.mount import MountOptions, mounted
from fastboot.imagefs.store import ImageStore, MountRecord
from fastboot.imagefs.sync import pull
from fastboot.imagefs.testing import Nginx, torch_venv

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
GiB = 1 << 30
MiB = 1 << 20
COLD_ROUNDS = 5
TORCH_ROUNDS = 3


def read_seq(path: Path, block: int = MiB) -> float:
    """Seconds to read `path` start to end in `block` reads into one reused buffer."""
    buf = bytearray(block)
    view = memoryview(buf)
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
    return time.perf_counter() - started


def large_folio_share(path: Path) -> float:
    """Share of path's cached pages that the page cache holds in large folios (more than one
    page per folio), from /proc/self/pagemap and /proc/kpageflags (root). It explains the warm
    read gap: a copy out of a large folio is one long memcpy; out of order-0 folios, a per-page
    walk. The file is mapped copy-on-write and only read, so the mapping shows the cache's pages."""
    page = mmap.PAGESIZE
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mapping = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        view = (ctypes.c_char * size).from_buffer(mapping)
        start = ctypes.addressof(view)
        for offset in range(0, size, page):  # fault every page in (read only)
            view[offset]
        present = large = 0
        with open("/proc/self/pagemap", "rb") as pagemap, open("/proc/kpageflags", "rb") as flags:
            pagemap.seek(start // page * 8)
            entries = pagemap.read(8 * (size // page))
            for (entry,) in struct.iter_unpack("Q", entries):
                if not entry >> 63:  # not present
                    continue
                present += 1
                flags.seek((entry & ((1 << 55) - 1)) * 8)
                (bits,) = struct.unpack("Q", flags.read(8))
                large += (bits >> 15 | bits >> 16) & 1  # KPF_COMPOUND_HEAD / _TAIL
        del view
    finally:
        mapping.close()
    return large / max(present, 1)


def drop_cache(path: Path) -> None:
    """Evict one file from the page cache (only this file; nothing host-wide)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fio(
    path: Path, rw: str, bs: str, size: str, warm: bool, runtime: int = 5, kept: Path | None = None
) -> dict[str, float]:
    """fio on one file; `warm` keeps the page cache (fio drops the file's pages by default).
    `kept`: the mount's passthrough file, whose pages a cold run must drop too (fio's own
    invalidate reaches only the FUSE file)."""
    if kept is not None and not warm:
        drop_cache(kept)
    out = subprocess.run(
        [
            "fio",
            "--name=b",
            f"--filename={path}",
            f"--rw={rw}",
            f"--bs={bs}",
            f"--size={size}",
            "--ioengine=psync",
            "--readonly",
            "--time_based",
            f"--runtime={runtime}",
            "--output-format=json",
            f"--invalidate={0 if warm else 1}",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]["read"]
    return {"iops": float(job["iops"]), "MBps": float(job["bw_bytes"]) / 1e6}


def values(record: MountRecord) -> dict[str, float]:
    return fbmetrics.read_textfile(Path(record.metrics_file))


def warm_pairs(local: Path, mount: Path, rounds: int = 7) -> tuple[list[float], list[float]]:
    """Warm sequential reads of the local file and the mounted one, alternating (one warm-up
    read of each first); returns the seconds of each."""
    read_seq(local)
    read_seq(mount)
    local_runs, mount_runs = [], []
    for _ in range(rounds):
        local_runs.append(read_seq(local))
        mount_runs.append(read_seq(mount))
    return local_runs, mount_runs


def wait_materialised(record: MountRecord, size: int, deadline_s: float = 120.0) -> float:
    """Seconds until the daemon reports `size` bytes materialised for passthrough (polling its
    metrics textfile, written every second); raises after the deadline."""
    started = time.perf_counter()
    while values(record).get("fastboot_imagefs_materialised_bytes_total", 0) < size:
        if time.perf_counter() - started > deadline_s:
            raise RuntimeError(f"file not materialised within {deadline_s:.0f} s")
        time.sleep(0.1)
    return time.perf_counter() - started


def fresh(store: ImageStore) -> None:
    shutil.rmtree(store.root / "cache", ignore_errors=True)
    (store.root / "cache").mkdir(mode=0o700)


def bench_index(work: Path, files: int) -> dict[str, Any]:
    src = work / "many"
    per_dir = 1000
    for d in range(files // per_dir):
        sub = src / f"pkg{d:03d}"
        sub.mkdir(parents=True)
        for i in range(per_dir):
            (sub / f"mod_{i:04d}.py").write_bytes(f"X = {d * per_dir + i}\n".encode())
    store = ImageStore(work / "store-many")
    started = time.perf_counter()
    ref = build(store, src, "many", progress=False)
    build_s = time.perf_counter() - started
    loads = []
    for _ in range(7):
        started = time.perf_counter()
        index = store.load_index(ref.index)
        loads.append(time.perf_counter() - started)
        del index
    point = work / "mnt-many"
    point.mkdir()
    started = time.perf_counter()
    with mounted("many", point, store):
        mount_s = time.perf_counter() - started
        started = time.perf_counter()
        listed = sum(len(files) for _, _, files in os.walk(point))
        walk_s = time.perf_counter() - started
    started = time.perf_counter()
    local = sum(len(files) for _, _, files in os.walk(src))
    local_walk_s = time.perf_counter() - started
    assert listed == local == files
    return {
        "files": files,
        "index_bytes": store.index_path(ref.index).stat().st_size,
        "build_s": build_s,
        "index_load_ms": 1000 * min(loads),
        "index_load_ms_median": 1000 * float(np.median(loads)),
        "mount_to_ready_s": mount_s,
        "walk_s": walk_s,
        "local_walk_s": local_walk_s,
    }


def bench_sequential(work: Path, server: Nginx) -> dict[str, Any]:
    src = work / "big"
    src.mkdir()
    big = src / "weights.bin"
    rng = np.random.default_rng(1)
    with open(big, "wb") as f:
        for _ in range(GiB // (64 * MiB)):
            f.write(rng.integers(0, 256, 64 * MiB, dtype=np.uint8).tobytes())
    out: dict[str, Any] = {}
    drop_cache(big)
    out["local_cold_s"] = read_seq(big)

    origin = ImageStore(work / "store-big")
    started = time.perf_counter()
    build(origin, src, "big", progress=False)
    out["build_s"] = time.perf_counter() - started
    origin.push("big", server.root)
    host = ImageStore(work / "host-big")
    pull(host, "big", server.url)
    point = work / "mnt-big"
    point.mkdir()
    opts = MountOptions(prefetch=False, record=False)  # the defaults, less profile record/replay
    # The build and push above left ~2 GiB of dirty pages: flushed now, so that their write-back
    # does not overlap a timed read.
    os.sync()
    # Cold: every round a fresh mount, an empty SSD cache and no kept file; the served pack is
    # read first, as a CDN or image server would have it in RAM. Medians: rounds on this shared
    # host vary by 2x (docs/imagefs.md).
    cold_runs = []

    def cold_mount() -> Any:
        fresh(host)
        shutil.rmtree(host.root / "files", ignore_errors=True)
        for pack in (server.root / "packs").glob("*.pack"):
            read_seq(pack)
        return mounted("big", point, host, opts)

    for _ in range(COLD_ROUNDS - 1):
        with cold_mount():
            cold_runs.append(read_seq(point / "weights.bin"))
    with cold_mount() as record:
        cold_runs.append(read_seq(point / "weights.bin"))
        out["remote_cold_runs_s"] = cold_runs
        out["remote_cold_s"] = float(np.median(cold_runs))
        # Read whole, the file is written to local disk in the background; later opens are
        # FUSE passthrough (the kernel reads that file). Warm = its page cache.
        out["materialise_wait_s"] = wait_materialised(record, GiB)
        [kept] = (host.root / "files").glob("*/*")
        # local and mount alternate, so drift on this shared host hits both; medians of 7
        local_runs, mount_runs = warm_pairs(big, point / "weights.bin")
        out["local_warm_runs_s"], out["warm_runs_s"] = local_runs, mount_runs
        out["local_warm_s"] = float(np.median(local_runs))
        out["warm_s"] = float(np.median(mount_runs))
        time.sleep(1.2)  # the daemon writes its metrics every second
        out["passthrough_opens"] = values(record)["fastboot_imagefs_passthrough_opens_total"]
        out["large_folio_share"] = {
            "local": large_folio_share(big),
            "mount": large_folio_share(point / "weights.bin"),
        }
        mount_fio = {
            (rw, warm): fio(point / "weights.bin", rw, bs, "1G", warm, kept=kept)
            for rw, bs in (("randread", "4k"), ("read", "1M"))
            for warm in (True, False)
        }
    cold = values(record)
    out["remote_gets"] = cold["fastboot_imagefs_remote_fetch_seconds_count"]
    out["remote_fetch_ms_mean"] = (
        1000 * cold["fastboot_imagefs_remote_fetch_seconds_sum"] / max(out["remote_gets"], 1)
    )
    no_passthrough = MountOptions(prefetch=False, record=False, passthrough=False)
    fresh(host)  # streamed reads left no chunks in the SSD cache; this read caches each one
    with mounted("big", point, host, no_passthrough):
        out["remote_cold_chunked_s"] = read_seq(point / "weights.bin")
    with mounted("big", point, host, no_passthrough):  # chunks in the SSD cache, page cache empty
        out["ssd_cache_s"] = read_seq(point / "weights.bin")
        # the daemon's own page cache (order-0 FUSE folios), the figure before passthrough
        local_runs, fuse_runs = warm_pairs(big, point / "weights.bin")
        out["warm_fuse_runs_s"] = fuse_runs
        out["warm_fuse_local_s"] = float(np.median(local_runs))
        out["warm_fuse_s"] = float(np.median(fuse_runs))
        out["large_folio_share"]["mount_fuse"] = large_folio_share(point / "weights.bin")
    out["fio"] = {}
    for rw, bs in (("randread", "4k"), ("read", "1M")):
        for warm in (True, False):
            out["fio"][f"{rw}_{bs}_{'warm' if warm else 'cold'}"] = {
                "local": fio(big, rw, bs, "1G", warm),
                "mount": mount_fio[(rw, warm)],
            }
    keys = ("local_cold", "local_warm", "remote_cold", "warm", "warm_fuse", "warm_fuse_local")
    for key in (*keys, "ssd_cache", "remote_cold_chunked"):
        out[f"{key}_GBps"] = GiB / out[f"{key}_s"] / 1e9
    return out


def bench_dedup(work: Path) -> dict[str, Any]:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(2)
    tensors = {f"layer{i}.weight": rng.standard_normal((1024, 1024), np.float32) for i in range(24)}
    a, b = work / "model-a", work / "model-b"
    a.mkdir()
    b.mkdir()
    save_file(tensors, str(a / "model.safetensors"))
    (a / "config.json").write_text('{"layers": 24}')
    tuned = dict(tensors)
    for name in ("layer22.weight", "layer23.weight"):  # a fine-tune of the last two layers
        tuned[name] = tensors[name] + 0.01
    save_file(tuned, str(b / "model.safetensors"))
    (b / "config.json").write_text('{"layers": 24, "tuned": true}')
    store = ImageStore(work / "store-dedup")
    build(store, a, "model-a", progress=False)
    build(store, b, "model-b", progress=False)
    logical = sum(r.total_bytes for r in store.list_refs())
    stored = sum(p.stat().st_size for p in (store.root / "packs").glob("*.pack"))
    return {"logical_bytes": logical, "stored_bytes": stored, "ratio": logical / stored}


def bench_torch(work: Path, server: Nginx) -> dict[str, Any]:
    venv = torch_venv(work / "venv")
    python_local = [str(venv / "bin" / "python"), "-c", "import torch"]

    def timed(argv: list[str]) -> float:
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, timeout=300)
        return time.perf_counter() - started

    out: dict[str, Any] = {"local_s": min(timed(python_local) for _ in range(3))}
    origin = ImageStore(work / "store-torch")
    started = time.perf_counter()
    build(origin, venv, "torch-env", progress=False)
    out["build_s"] = time.perf_counter() - started
    origin.push("torch-env", server.root)
    host = ImageStore(work / "host-torch")
    pull(host, "torch-env", server.url)
    point = work / "mnt-torch"
    point.mkdir()
    argv = [str(point / "bin" / "python"), "-c", "import torch"]
    with mounted("torch-env", point, host) as record:
        cold_runs = [timed(argv)]
        out["warm_s"] = min(timed(argv) for _ in range(3))
    cold = values(record)
    # More rounds, alternating, each a fresh mount with an empty SSD cache: the first without
    # a profile (prefetch off), the other replaying the profile the first mounts recorded.
    prefetch_runs: list[float] = []
    for _ in range(TORCH_ROUNDS):
        for runs, options in ((cold_runs, MountOptions(prefetch=False)), (prefetch_runs, None)):
            fresh(host)
            options = options or MountOptions(prefetch_rate=0)
            with mounted("torch-env", point, host, options) as record:
                runs.append(timed(argv))
            if runs is prefetch_runs:
                replay = values(record)
    out["cold_runs_s"], out["prefetch_runs_s"] = cold_runs, prefetch_runs
    out["cold_s"] = statistics.median(cold_runs)
    out["prefetch_s"] = statistics.median(prefetch_runs)
    image = cold["fastboot_imagefs_image_bytes"]
    out |= {
        "image_bytes": image,
        "image_stored_bytes": cold["fastboot_imagefs_image_stored_bytes"],
        "fetched_bytes": cold['fastboot_imagefs_chunk_bytes_total{tier="remote"}'],
        "fetched_raw_bytes": cold["fastboot_imagefs_remote_raw_bytes_total"],
        "gets": cold["fastboot_imagefs_remote_fetch_seconds_count"],
        "prefetch_bytes": replay["fastboot_imagefs_prefetch_bytes_total"],
        "prefetch_used_bytes": replay["fastboot_imagefs_prefetch_used_bytes_total"],
    }
    out["fetched_share"] = out["fetched_bytes"] / image
    out["fetched_raw_share"] = out["fetched_raw_bytes"] / image
    return out


RESTORED = re.compile(r"restored snapshot (\w+) in ([\d.]+) s; cold boot was ([\d.]+) s")
PHASES = {
    "verify_s": re.compile(r"verified \d+ files in ([\d.]+) s"),
    "criu_s": re.compile(r"criu restore took ([\d.]+) s"),
    "answer_s": re.compile(r"restored engine answered in ([\d.]+) s"),
}


def serve_once(
    argv: list[str], log: Path, env: dict[str, str], deadline_s: float
) -> dict[str, Any]:
    """`fastboot serve argv` until it serves a restored engine, then Ctrl-C; its timings."""
    started = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastboot", "serve", *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
        )
    try:
        while not (match := RESTORED.search(text := log.read_text(errors="replace"))):
            if proc.poll() is not None or time.perf_counter() - started > deadline_s:
                raise RuntimeError(f"no restore (exit {proc.poll()}); {log}:\n{text[-3000:]}")
            time.sleep(0.05)
        wall = time.perf_counter() - started
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text(errors="replace")
    out_: dict[str, Any] = {
        "wall_s": wall,
        "restore_s": float(match[2]),
        "cold_boot_s": float(match[3]),
        "cold_booted": "cold boot ready in" in text,
    }
    for key, regex in PHASES.items():
        found = regex.findall(text)
        out_[key] = float(found[-1]) if found else None
    return out_


def bench_snapshot(work: Path, server: Nginx) -> dict[str, Any]:
    """Restore from a local snapshot vs from its image mounted in its place vs unpacked."""
    from fastboot.imagefs.snapshots import unpack_snapshot
    from fastboot.models.tiny import cpu_serve_flags, write_tiny_llama
    from fastboot.serve import free_port

    model = write_tiny_llama(work / "tiny", "tiny")
    port = free_port()
    env = {"FASTBOOT_HOME": str(work / "home"), "FASTBOOT_LOG_LEVEL": "DEBUG"}
    logs = work / "serve-logs"
    logs.mkdir()

    def run(name: str, snapshots: Path, deadline_s: float = 180) -> dict[str, Any]:
        argv = [str(model), "--port", str(port), *cpu_serve_flags("tiny")]
        argv += ["--fastboot-snapshot-dir", str(snapshots)]
        result = serve_once(argv, logs / f"{name}.log", env, deadline_s)
        print(f"  {name}: {result}", file=sys.stderr)
        return result

    local = work / "snaps-local"
    out: dict[str, Any] = {"first": run("first", local, 900)}
    (snap,) = [p for p in local.iterdir() if p.is_dir() and not p.name.startswith(".")]
    files = [p for p in snap.rglob("*") if p.is_file()]
    out["snapshot_bytes"] = sum(p.stat().st_size for p in files)
    out["local_warm"] = run("local-warm", local)
    for path in files:
        drop_cache(path)
    out["local_cold"] = run("local-cold", local)

    origin = ImageStore(work / "store-snap")
    started = time.perf_counter()
    ref = build(origin, snap, f"snap-{snap.name}", progress=False)
    out["build_s"] = time.perf_counter() - started
    out["image_stored_bytes"] = ref.stored_bytes
    origin.push(ref.name, server.root)
    host = ImageStore(work / "host-snap")
    pull(host, ref.name, server.url)
    mounted_dir = work / "snaps-mounted"
    point = mounted_dir / snap.name
    point.mkdir(parents=True)
    opts = MountOptions(prefetch=False, record=False, ram_bytes=512 * MiB)
    with mounted(ref.name, point, host, opts) as record:
        out["mount_cold"] = run("mount-cold", mounted_dir)
        out["mount_warm"] = run("mount-warm", mounted_dir)
    cold = values(record)
    out["mount_fetched_bytes"] = cold['fastboot_imagefs_chunk_bytes_total{tier="remote"}']

    fresh(host)
    unpacked = work / "snaps-unpacked"
    done = unpack_snapshot(ref.name, unpacked, host)
    out["unpack_s"] = done.seconds
    out["unpack_bytes"] = done.bytes
    out["unpacked_restore"] = run("unpacked", unpacked)
    return out


def snapshot_table(sn: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    def row(label: str, case: str, base: str) -> tuple[str, str, str, str, str]:
        mine, ref = sn[case]["restore_s"], sn[base]["restore_s"]
        phases = f"verify {sn[case]['verify_s']:.2f} + criu {sn[case]['criu_s']:.2f}"
        return (
            f"{label} ({phases})",
            f"{mine:.2f} s",
            f"{base.replace('_', ' ')} {ref:.2f} s",
            f"{mine / ref:.2f}x",
            "",
        )

    gb = sn["snapshot_bytes"] / 1e9
    return [
        row("restore, local snapshot, page cache cold", "local_cold", "local_warm"),
        row("restore, snapshot image mounted, cold from nginx", "mount_cold", "local_cold"),
        row("restore, snapshot image mounted, warm", "mount_warm", "local_warm"),
        (
            f"unpack-snapshot from nginx ({gb:.2f} GB)",
            f"{sn['unpack_s']:.2f} s",
            f"build {sn['build_s']:.1f} s",
            f"{sn['unpack_bytes'] / sn['unpack_s'] / 1e9:.2f} GB/s",
            "",
        ),
        row("restore after unpack-snapshot", "unpacked_restore", "local_warm"),
        (
            "snapshot image stored (zstd where it pays)",
            f"{sn['image_stored_bytes'] / 1e9:.2f} GB",
            f"files {gb:.2f} GB",
            f"{sn['image_stored_bytes'] / sn['snapshot_bytes']:.2f}x",
            "",
        ),
    ]


def plot_snapshot(sn: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = ["local_warm", "local_cold", "mount_warm", "mount_cold", "unpacked_restore"]
    labels = [c.replace("_", "\n") for c in cases]
    labels[-1] = "unpack from nginx,\nthen restore"
    fig, ax = plt.subplots(figsize=(9, 4.5))
    bottom = [0.0] * len(cases)
    unpack = [sn["unpack_s"] if c == "unpacked_restore" else 0.0 for c in cases]
    ax.bar(labels, unpack, color="#58c")
    bottom = unpack
    for phase, color in (("verify_s", "#c84"), ("criu_s", "#2a7"), ("answer_s", "#888")):
        heights = [sn[c][phase] or 0.0 for c in cases]
        ax.bar(labels, heights, bottom=bottom, color=color)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.legend(["unpack-snapshot", "verify", "criu restore", "first answer"])
    ax.set_ylabel("seconds")
    ax.set_title("fastboot serve restore of the tiny model: local snapshot vs snapshot image")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_table(rows: list[tuple[str, str, str, str, str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    header = ("measure", "imagefs", "baseline", "ratio", "target")
    widths = [max(w, len(h)) for w, h in zip(widths, header, strict=True)]
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


def table(results: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    rows: list[tuple[str, str, str, str, str]] = []
    ix = results["index"]
    rows.append(
        (
            "index load, 100k files",
            f"{ix['index_load_ms']:.1f} ms",
            "target 100 ms",
            f"{ix['index_load_ms'] / 100:.2f}x",
            "ok" if ix["index_load_ms"] < 100 else "MISS",
        )
    )
    rows.append(
        (
            "walk 100k files (warm)",
            f"{ix['walk_s']:.2f} s",
            f"local {ix['local_walk_s']:.2f} s",
            f"{ix['walk_s'] / ix['local_walk_s']:.2f}x",
            "",
        )
    )
    sq = results["sequential"]
    warm_ratio = sq["warm_GBps"] / sq["local_warm_GBps"]
    rows += [
        (
            "1 GiB seq, warm (page cache, passthrough)",
            f"{sq['warm_GBps']:.2f} GB/s",
            f"local warm {sq['local_warm_GBps']:.2f} GB/s",
            f"{warm_ratio:.2f}x",
            "ok" if warm_ratio >= 0.9 else "MISS",
        ),
        (
            "  its cached pages in large folios",
            f"{sq['large_folio_share']['mount']:.0%}",
            f"local {sq['large_folio_share']['local']:.0%}",
            "",
            "",
        ),
        (
            "1 GiB seq, warm, --no-passthrough",
            f"{sq['warm_fuse_GBps']:.2f} GB/s",
            f"local warm {sq['warm_fuse_local_GBps']:.2f} GB/s",
            f"{sq['warm_fuse_GBps'] / sq['warm_fuse_local_GBps']:.2f}x",
            f"large folios {sq['large_folio_share']['mount_fuse']:.0%}",
        ),
        (
            f"1 GiB seq, cold from nginx (median of {len(sq['remote_cold_runs_s'])})",
            f"{sq['remote_cold_GBps']:.2f} GB/s "
            f"({GiB / max(sq['remote_cold_runs_s']) / 1e9:.2f}-"
            f"{GiB / min(sq['remote_cold_runs_s']) / 1e9:.2f})",
            "target 1 GB/s",
            f"{sq['remote_cold_GBps']:.2f}x",
            "ok" if sq["remote_cold_GBps"] >= 1 else "MISS",
        ),
        (
            "  the same, --no-passthrough (chunks cached)",
            f"{sq['remote_cold_chunked_GBps']:.2f} GB/s",
            "target 1 GB/s",
            f"{sq['remote_cold_chunked_GBps']:.2f}x",
            "one round",
        ),
        (
            "1 GiB seq, from SSD cache",
            f"{sq['ssd_cache_GBps']:.2f} GB/s",
            f"local cold {sq['local_cold_GBps']:.2f} GB/s",
            f"{sq['ssd_cache_GBps'] / sq['local_cold_GBps']:.2f}x",
            "",
        ),
    ]
    for name, case in sq["fio"].items():
        rw, bs, state = name.split("_")
        key = "iops" if rw == "randread" else "MBps"
        mine, base = case["mount"][key], case["local"][key]
        label = f"fio {rw} {bs} {state} ({'IOPS' if key == 'iops' else 'MB/s'})"
        rows.append((label, f"{mine:,.0f}", f"local {base:,.0f}", f"{mine / base:.2f}x", ""))
    dd = results["dedup"]
    rows.append(
        (
            "dedup, 2 model variants",
            f"{dd['stored_bytes'] / 1e6:.0f} MB stored",
            f"{dd['logical_bytes'] / 1e6:.0f} MB logical",
            f"{dd['ratio']:.2f}x",
            "",
        )
    )
    if "torch" in results:
        rows += torch_table(results["torch"])
    return rows


def torch_table(t: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for key, label in (("cold_s", "cold"), ("prefetch_s", "with prefetch"), ("warm_s", "warm")):
        ratio = t[key] / t["local_s"]
        target = ("ok" if ratio <= 1.5 else "MISS") if key == "prefetch_s" else ""
        rows.append(
            (
                f"import torch, {label}",
                f"{t[key]:.2f} s",
                f"local {t['local_s']:.2f} s",
                f"{ratio:.2f}x",
                target,
            )
        )
    rows.append(
        (
            "import torch, bytes fetched",
            f"{t['fetched_bytes'] / 1e6:.0f} MB",
            f"image {t['image_bytes'] / 1e6:.0f} MB",
            f"{t['fetched_share']:.1%}",
            "ok" if t["fetched_share"] <= 0.10 else "MISS",
        )
    )
    return rows


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sq = results["sequential"]
    fig, axes = plt.subplots(1, 2 if "torch" in results else 1, figsize=(12, 4.5), squeeze=False)
    names = [
        "local cold",
        "local warm",
        "mount warm",
        "warm, no pass-\nthrough",
        "mount SSD cache",
        "mount cold (nginx)",
    ]
    vals = [
        sq[k]
        for k in (
            "local_cold_GBps",
            "local_warm_GBps",
            "warm_GBps",
            "warm_fuse_GBps",
            "ssd_cache_GBps",
            "remote_cold_GBps",
        )
    ]
    ax = axes[0][0]
    ax.bar(names, vals, color=["#888", "#888", "#2a7", "#2a7", "#2a7", "#2a7"])
    ax.set_ylabel("GB/s")
    ax.set_title("sequential read of a 1 GiB file")
    ax.tick_params(axis="x", rotation=20)
    if "torch" in results:
        t = results["torch"]
        ax = axes[0][1]
        labels = ["local", "image cold", "image prefetch", "image warm"]
        ax.bar(
            labels,
            [t["local_s"], t["cold_s"], t["prefetch_s"], t["warm_s"]],
            color=["#888", "#2a7", "#2a7", "#2a7"],
        )
        ax.set_ylabel("seconds")
        ax.set_title(f"import torch ({t['fetched_share']:.1%} of the image fetched)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument(
        "--snapshot", action="store_true", help="only the snapshot-image restore measurements"
    )
    parser.add_argument(
        "--torch", action="store_true", help="only `import torch` from an env image"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    default = "imagefs_snapshot" if args.snapshot else "imagefs_torch" if args.torch else "imagefs"
    args.out = args.out or RESULTS / f"{default}.json"
    if os.geteuid() != 0:
        print("imagefs_bench needs root (FUSE mounts)", file=sys.stderr)
        return 2
    results: dict[str, Any] = {
        "host": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "loadavg_at_start": os.getloadavg(),
        },
        "created": time.time(),
    }
    with tempfile.TemporaryDirectory(prefix="imagefs-bench-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        (work / "served").mkdir()
        steps: list[tuple[str, Callable[[], dict[str, Any]]]] = []
        with Nginx(work / "served", work / "nginx") as server:
            steps = [
                ("index", lambda: bench_index(work, args.files)),
                ("sequential", lambda: bench_sequential(work, server)),
                ("dedup", lambda: bench_dedup(work)),
            ]
            if not args.skip_torch:
                steps.append(("torch", lambda: bench_torch(work, server)))
            if args.snapshot:
                steps = [("snapshot", lambda: bench_snapshot(work, server))]
            if args.torch:
                steps = [("torch", lambda: bench_torch(work, server))]
            for name, step in steps:
                started = time.perf_counter()
                results[name] = step()
                print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    results["host"]["loadavg_at_end"] = os.getloadavg()
    if args.snapshot:
        rows = snapshot_table(results["snapshot"])
    else:
        rows = torch_table(results["torch"]) if args.torch else table(results)
    results["table"] = rows
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    if args.snapshot:
        plot_snapshot(results["snapshot"], args.out.with_suffix(".png"))
    elif not args.torch:
        plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
