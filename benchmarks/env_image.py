"""The engine run from an environment image vs from the local virtual environment, in one run.

  1. This virtual environment (sys.prefix: torch, vLLM, fastboot) is built as an image, pushed
     to a directory that a loopback nginx serves, and pulled into an empty store (ref and index
     only): every chunk the engine reads comes over HTTP on first use.
  2. Baseline: `fastboot serve` of the tiny model from the local environment: a cold boot that
     snapshots, then --runs restores (each a new `fastboot serve`).
  3. The same with `--fastboot-env-image`: the cold boot reads the environment lazily from
     nginx (bytes fetched vs image size), then --runs restores, each mounting the image again
     (chunks now in the local SSD cache; the mount's page cache is new).

Each time is from starting `fastboot serve` until a completion has been answered and fastboot
has logged the restore (oracle checked) or the cold boot ready. Prints a table with medians and
ratios; writes benchmarks/results/env_image.json.

    .venv/bin/python benchmarks/env_image.py [--runs 3] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.boot_latency import log_since, timed_boot  # noqa: E402
from fastboot.imagefs import metrics as fbmetrics  # noqa: E402
from fastboot.imagefs.build import build  # noqa: E402
from fastboot.imagefs.store import ImageStore  # noqa: E402
from fastboot.imagefs.sync import pull  # noqa: E402
from fastboot.imagefs.testing import Nginx  # noqa: E402
from fastboot.models.tiny import cpu_serve_flags, write_tiny_llama  # noqa: E402
from fastboot.serve import free_port  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
IMAGE = "env"


def cold_boot(argv: list[str], port: int, model: str, log: Path) -> dict[str, Any]:
    """The first `fastboot serve`: a cold boot that snapshots."""
    snapshots = Path(argv[argv.index("--fastboot-snapshot-dir") + 1])
    offset = log.stat().st_size if log.exists() else 0
    first = timed_boot(argv, port, model, log, signal.SIGINT, snapshots)
    cold = re.search(r"cold boot ready in ([\d.]+) s", log_since(log, offset))
    assert cold, "no cold boot line in the log"
    return {"cold_boot_s": float(cold[1]), "first_run_s": first}


def restores(argv: list[str], port: int, model: str, log: Path, runs: int) -> dict[str, Any]:
    """`runs` more `fastboot serve`s, each restoring the snapshot."""
    times = []
    for _ in range(runs):
        offset = log.stat().st_size
        times.append(timed_boot(argv, port, model, log, signal.SIGINT, None, "restored snapshot"))
        assert "cold boot ready" not in log_since(log, offset), "a restore run cold booted"
    return {"restore_s": times, "restore_median_s": statistics.median(times)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (GBs)")
    args = parser.parse_args()
    if sys.prefix == sys.base_prefix:
        print("run this from a virtual environment (.venv/bin/python)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="fastboot-env-bench-"))
    try:
        return bench(work, args.runs)
    finally:
        if args.keep:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def bench(work: Path, runs: int) -> int:
    os.chmod(work, 0o755)  # nginx workers read the served directory
    model = write_tiny_llama(work / "model")
    port = free_port()
    flags = [str(model), "--port", str(port), *cpu_serve_flags("tiny")]
    serve = [sys.executable, "-m", "fastboot", "serve", *flags]
    out: dict[str, Any] = {
        "host": {"kernel": platform.release(), "cpus": os.cpu_count()},
        "loadavg_at_start": os.getloadavg(),
        "created": time.time(),
    }

    origin = ImageStore(work / "origin")
    started = time.perf_counter()
    ref = build(origin, Path(sys.prefix), IMAGE, progress=False)
    out["build_s"] = time.perf_counter() - started
    out["image_bytes"] = ref.total_bytes
    (work / "served").mkdir()
    origin.push(IMAGE, work / "served")
    server = Nginx(work / "served", work / "nginx")
    server.start()
    home = work / "home"
    host = ImageStore(home / "images")
    try:
        pull(host, IMAGE, server.url)
        print("[local] cold boot + snapshot, then restores", flush=True)
        argv = [*serve, "--fastboot-snapshot-dir", str(work / "s-local")]
        local = cold_boot(argv, port, str(model), work / "local.log")
        local |= restores(argv, port, str(model), work / "local.log", runs)
        print(f"[local] {local}", flush=True)
        print("[image] cold boot (lazy from nginx) + snapshot, then restores", flush=True)
        os.environ["FASTBOOT_HOME"] = str(home)  # timed_boot passes the environment on
        argv = [
            *serve,
            "--fastboot-env-image",
            IMAGE,
            "--fastboot-snapshot-dir",
            str(work / "s-img"),
        ]
        image = cold_boot(argv, port, str(model), work / "image.log")
        # What the cold boot fetched over HTTP (the mount's last metrics, written at exit; the
        # next mount of the same image rewrites the file).
        (prom,) = (host.root / "mounts").glob("*.prom")
        cold = fbmetrics.read_textfile(prom)
        wire = cold['fastboot_imagefs_chunk_bytes_total{tier="remote"}']  # as stored: compressed
        raw = cold["fastboot_imagefs_remote_raw_bytes_total"]  # the same chunks, decompressed
        image |= {
            "fetched_bytes": wire,
            "fetched_raw_bytes": raw,
            "fetched_share": wire / ref.total_bytes,
            "fetched_raw_share": raw / ref.total_bytes,
            "image_stored_bytes": cold["fastboot_imagefs_image_stored_bytes"],
        }
        image |= restores(argv, port, str(model), work / "image.log", runs)
        print(f"[image] {image}", flush=True)
    finally:
        server.stop()
    out["local"], out["image"] = local, image
    out["loadavg_at_end"] = os.getloadavg()

    rows = [
        ("cold boot (engine ready)", "cold_boot_s"),
        ("restore, median", "restore_median_s"),
    ]
    print(f"\n{'':28} {'local venv':>11} {'env image':>11} {'image/local':>12}")
    for label, key in rows:
        a, b = float(local[key]), float(image[key])
        print(f"{label:28} {a:10.2f}s {b:10.2f}s {b / a:11.2f}x")
    print(
        f"env image {ref.total_bytes / 1e9:.2f} GB ({image['image_stored_bytes'] / 1e9:.2f} GB "
        f"stored); the cold boot fetched {image['fetched_bytes'] / 1e6:.0f} MB over HTTP "
        f"({100 * image['fetched_share']:.1f}% of the image), chunks holding "
        f"{image['fetched_raw_bytes'] / 1e6:.0f} MB ({100 * image['fetched_raw_share']:.1f}%)"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "env_image.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
