"""A replica on a host that has never seen the snapshot: cold boot vs full pull vs lazy restore.

One run, in a network namespace of its own (only loopback; the script re-executes itself under
`unshare --net`): host A cold-boots the built-in model with `fastboot serve` (which snapshots
it) and publishes the snapshot with `fastboot snapshot push` into a directory nginx serves on
loopback. Then each "fresh host" is another FASTBOOT_HOME (empty image store and SSD cache, no
snapshot) with the served files dropped from the page cache (posix_fadvise DONTNEED: the remote
store's pages are cold), measured from starting `fastboot serve` to its first answered
completion after the restore proved its oracle:

  (a) cold boot: `fastboot serve --fastboot-no-snapshot` (plain vLLM);
  (b) full verified pull + local restore: `fastboot image unpack-snapshot`, then `fastboot serve`;
  (c) `fastboot serve --fastboot-snapshot-remote URL`, each way it can bring the snapshot:
      fetched: every file written from verified chunks by parallel ranged GETs (zero chunks
      left as holes), then a local restore (the default); then a second replica on that host;
      mount, mapped: restored from the mounted image, page images mapped (only touched pages
      fetched); mount, copied: the same with the page images read (FASTBOOT_COPY_PAGES=1);
      mount, lazy pages: `criu restore --lazy-pages`, each page served on its first touch by a
      `criu lazy-pages` daemon reading the mount (FASTBOOT_LAZY_PAGES=1).

Bytes fetched are what nginx sent (its access log, $body_bytes_sent) from the start of a run
until its first answer. Also: what the snapshot adds to a store that already holds another
snapshot of the same model (`--dedup`: a second snapshot on another port).

    .venv/bin/python benchmarks/fresh_host.py [--size tiny|1gib] [--dedup] [--rounds N] [--keep]
    .venv/bin/python benchmarks/fresh_host.py [--size tiny|1gib] --dedup-only [--fixed-layout]

Writes benchmarks/results/fresh_host[_1gib].json and .png (--dedup-only: host A's two
snapshots and pushes only, fresh_host_dedup[_1gib][_fixed_layout].json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import blake3
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.boot_latency import log_since, timed_boot  # noqa: E402
from benchmarks.imagefs_bench import drop_cache  # noqa: E402
from fastboot.imagefs.build import build  # noqa: E402
from fastboot.imagefs.store import ImageStore  # noqa: E402
from fastboot.imagefs.testing import Nginx  # noqa: E402
from fastboot.models.tiny import cpu_serve_flags, write_tiny_llama  # noqa: E402
from fastboot.serve import free_port  # noqa: E402
from fastboot.snapshot.store import Manifest, Store  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
IN_NETNS = "FASTBOOT_BENCH_NETNS"
RESTORED = "restored snapshot"


class CountingNginx(Nginx):
    """nginx that logs each response's time and body bytes (unbuffered, one line each)."""

    def __init__(self, root: Path, workdir: Path) -> None:
        super().__init__(root, workdir)
        self.access = workdir / "access.log"
        text = self.config.read_text().replace(
            "access_log off;",
            f"log_format sent '$msec $body_bytes_sent $uri';\n    access_log {self.access} sent;",
        )
        self.config.write_text(text)

    def sent_between(self, start: float, end: float) -> dict[str, int]:
        """Bytes and requests answered in [start, end] (wall clock)."""
        total = requests = 0
        if self.access.exists():
            for line in self.access.read_text().splitlines():
                stamp, sent, _ = line.split(" ", 2)
                if start <= float(stamp) <= end:
                    total += int(sent)
                    requests += 1
        return {"bytes": total, "requests": requests}


def drop_cached(root: Path) -> None:
    """Evict every file under root from the page cache (the remote store's disk is cold)."""
    for path in root.rglob("*"):
        if path.is_file():
            drop_cache(path)


def fastboot(*args: str) -> list[str]:
    return [sys.executable, "-m", "fastboot", *args]


#: Host A's engines with a fixed address-space layout and hash seed (--fixed-layout): setarch
#: -R sets ADDR_NO_RANDOMIZE on fastboot, which every process it starts inherits (personality
#: survives exec), and the engine inherits PYTHONHASHSEED.
FIXED_LAYOUT: dict[str, Any] = {"prefix": [], "env": {}}


def host_a_serve(*flags: str) -> list[str]:
    return [*FIXED_LAYOUT["prefix"], *fastboot("serve", *flags)]


def fresh_home(work: Path, name: str) -> dict[str, str]:
    home = work / name
    shutil.rmtree(home, ignore_errors=True)
    (home / "tmp").mkdir(parents=True)
    return {"FASTBOOT_HOME": str(home), "TMPDIR": str(home / "tmp")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("tiny", "1gib"), default="tiny")
    parser.add_argument("--dedup", action="store_true", help="also push a second snapshot")
    parser.add_argument(
        "--dedup-only", action="store_true", help="only the two snapshots and what each adds"
    )
    parser.add_argument(
        "--fixed-layout",
        action="store_true",
        help="host A's engines without ASLR and with PYTHONHASHSEED=0 (what dedup could gain)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (GBs)")
    parser.add_argument(
        "--reuse", type=Path, help="a work directory kept by --keep: skip host A and the push"
    )
    parser.add_argument("--only", help="comma-separated runs to measure (default: all)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of the runs after (a); medians reported"
    )
    parser.add_argument(
        "--env-image",
        action="store_true",
        help="instead: the engine from an env image of this venv, remote and uncached too",
    )
    args = parser.parse_args()
    if os.environ.get(IN_NETNS) != "1":
        # Everything, nginx included, on a loopback nobody else shares.
        argv = ["unshare", "--net", "--", sys.executable, *sys.argv]
        return subprocess.call(argv, env={**os.environ, IN_NETNS: "1"})
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    work = args.reuse or Path(tempfile.mkdtemp(prefix="fastboot-fresh-host-"))
    only = set(args.only.split(",")) if args.only else None
    try:
        if args.env_image:
            return bench_env(work, args.size)
        if args.fixed_layout:
            FIXED_LAYOUT.update(prefix=["setarch", "-R"], env={"PYTHONHASHSEED": "0"})
        if args.dedup_only:
            return bench_dedup(work, args.size, args.fixed_layout)
        return bench(work, args.size, args.dedup, args.reuse is not None, only, args.rounds)
    finally:
        if args.keep or args.reuse:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def bench(
    work: Path, size: str, dedup: bool, reuse: bool, only: set[str] | None, rounds: int
) -> int:
    served, log = work / "served", work / "bench.log"
    if reuse:
        out = json.loads((work / "setup.json").read_text())
        port, model = out["port"], Path(out["model"])
        flags = [str(model), "--port", str(port), *cpu_serve_flags(size)]
    else:
        out = set_up(work, size, dedup)
        port, model = out["port"], Path(out["model"])
        flags = [str(model), "--port", str(port), *cpu_serve_flags(size)]
    server = CountingNginx(served, work / "nginx")
    server.start()
    try:
        out["rounds"] = rounds
        out["runs"] = runs(work, flags, Runner(port, str(model), log, server, only), rounds)
    finally:
        server.stop()
    out["loadavg_at_end"] = os.getloadavg()
    summarise(out)
    if only:
        return 0  # a partial run is for looking, not for the record
    name = "fresh_host" if size == "tiny" else f"fresh_host_{size}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(out, RESULTS / f"{name}.png")
    return 0


def bench_dedup(work: Path, size: str, fixed_layout: bool) -> int:
    """Two snapshots of one model pushed into one store (--dedup-only): what the second adds."""
    out = set_up(work, size, dedup=True)
    out["fixed_layout"] = fixed_layout
    first, second = out["push"], out["dedup"]
    out["second_adds_share"] = second["new_gb"] / second["stored_gb"]
    out["page_ceiling_share"] = second["pages"]["shared_share"]
    out["loadavg_at_end"] = os.getloadavg()
    print(
        f"first snapshot: {first['files_gb']:.2f} GB of files, {first['new_gb']:.2f} GB stored; "
        f"second: {second['files_gb']:.2f} GB of files, {second['stored_gb']:.2f} GB stored, "
        f"{second['new_gb']:.2f} GB of it new ({100 * out['second_adds_share']:.1f}%); "
        f"pages any chunking could share: {100 * second['pages']['shared_share']:.1f}%"
    )
    name = "fresh_host_dedup" + ("" if size == "tiny" else f"_{size}")
    name += "_fixed_layout" if fixed_layout else ""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


def bench_env(work: Path, size: str) -> int:
    """The env-image runs only (--env-image): fresh_host_env[_1gib].json."""
    os.chmod(work, 0o755)
    model = write_tiny_llama(work / "model", size)
    port = free_port()
    flags = [str(model), "--port", str(port), *cpu_serve_flags(size)]
    log = work / "bench.log"
    out: dict[str, Any] = {"size": size, "host": {"cpus": os.cpu_count()}, "created": time.time()}
    out["host_a"] = env_set_up(work, flags, port, str(model), log)
    server = CountingNginx(work / "served", work / "nginx")
    server.start()
    try:
        out["runs"] = env_runs(work, flags, Runner(port, str(model), log, server, None))
    finally:
        server.stop()
    total = out["host_a"]["snapshot"]["bytes"]
    for name, run in out["runs"].items():
        fetched = run["before_first_answer"]["bytes"]
        print(
            f"{name:24} {run['first_answer_s']:8.2f} s  fetched {fetched / 1e6:7.0f} MB "
            f"({100 * fetched / total:.1f}% of the snapshot's bytes)"
        )
    name = "fresh_host_env" if size == "tiny" else f"fresh_host_env_{size}"
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


def set_up(work: Path, size: str, dedup: bool) -> dict[str, Any]:
    """Host A: cold boot, snapshot, push (and a second snapshot with dedup)."""
    os.chmod(work, 0o755)  # nginx workers read the served directory
    model = write_tiny_llama(work / "model", size)
    port = free_port()
    flags = [str(model), "--port", str(port), *cpu_serve_flags(size)]
    served, log = work / "served", work / "bench.log"
    out: dict[str, Any] = {
        "port": port,
        "model": str(model),
        "size": size,
        "host": {"kernel": platform.release(), "cpus": os.cpu_count()},
        "loadavg_at_start": os.getloadavg(),
        "created": time.time(),
    }
    host_a = fresh_home(work, "host-a")
    snapshots_a = Path(host_a["FASTBOOT_HOME"]) / "snapshots"
    first = timed_boot(
        host_a_serve(*flags),
        port,
        str(model),
        log,
        signal.SIGINT,
        snapshots_a,
        RESTORED,
        extra_env={**host_a, **FIXED_LAYOUT["env"]},
    )
    cold_line = re.search(r"cold boot ready in ([\d.]+) s", log.read_text())
    assert cold_line, "no cold boot line"
    (manifest,) = [m for m in Store(snapshots_a).list() if isinstance(m, Manifest)]
    out["host_a"] = {"first_serve_s": first, "cold_boot_s": float(cold_line[1])}
    out["snapshot"] = {"id": manifest.id, "bytes": manifest.total_bytes}
    out["push"] = push(manifest.id, served, host_a)
    if dedup:
        out["dedup"] = second_snapshot(model, size, served, host_a, log)
    (work / "setup.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def push(
    snapshot_id: str, served: Path, home: dict[str, str], snapshots: Path | None = None
) -> dict[str, Any]:
    """`fastboot snapshot push` (from snapshots, else home's snapshot directory), timed."""
    start = time.monotonic()
    where = ["--dir", str(snapshots)] if snapshots else []
    done = subprocess.run(
        fastboot("snapshot", *where, "push", snapshot_id, "--to", str(served)),
        env={**os.environ, **home},
        capture_output=True,
        text=True,
        check=True,
    )
    line = done.stdout.strip()
    print(line)
    numbers = [float(x) for x in re.findall(r"([\d.]+) GB", line)]
    return {
        "seconds": time.monotonic() - start,
        "files_gb": numbers[0],
        "stored_gb": numbers[1],
        "new_gb": numbers[2],
        "line": line,
    }


def second_snapshot(
    model: Path, size: str, served: Path, home: dict[str, str], log: Path
) -> dict[str, Any]:
    """Another snapshot of the same model and engine (another port), pushed into the same
    store: what it adds there is what the two do not share."""
    port = free_port()
    flags = [str(model), "--port", str(port), *cpu_serve_flags(size)]
    snapshots = Path(home["FASTBOOT_HOME"]) / "snapshots"
    before = {m.id for m in Store(snapshots).list() if isinstance(m, Manifest)}
    timed_boot(
        host_a_serve(*flags),
        port,
        str(model),
        log,
        signal.SIGINT,
        None,
        RESTORED,
        extra_env={**home, **FIXED_LAYOUT["env"]},
    )
    (new,) = [m for m in Store(snapshots).list() if isinstance(m, Manifest) and m.id not in before]
    (old,) = before
    return {
        **push(new.id, served, home),
        "pages": page_sharing(snapshots / old / "images", snapshots / new.id / "images"),
    }


PAGE = 4096


def nonzero_pages(images: Path) -> set[bytes]:
    """The BLAKE3 of every non-zero 4 KiB page of a snapshot's page images."""
    found: set[bytes] = set()
    for path in sorted(images.glob("pages-*.img")):
        data = np.fromfile(path, dtype=np.uint64)
        pages = data[: len(data) // (PAGE // 8) * (PAGE // 8)].reshape(-1, PAGE // 8)
        raw = pages.view(np.uint8)
        for i in np.flatnonzero(pages.any(axis=1)):
            found.add(blake3.blake3(raw[i].tobytes()).digest(16))
    return found


def page_sharing(first: Path, second: Path) -> dict[str, Any]:
    """What any chunking could share at best: distinct non-zero pages of the second snapshot
    that the first also has (page images only: the rest is kilobytes)."""
    a, b = nonzero_pages(first), nonzero_pages(second)
    shared = len(a & b)
    print(f"pages: {shared:,} of the second snapshot's {len(b):,} distinct non-zero pages shared")
    return {"first": len(a), "second": len(b), "shared": shared, "shared_share": shared / len(b)}


class Runner:
    """Measures runs of `fastboot serve` from start to first answer, into results."""

    def __init__(
        self, port: int, model: str, log: Path, server: CountingNginx, only: set[str] | None
    ) -> None:
        self.port, self.model, self.log, self.server, self.only = port, model, log, server, only
        self.results: dict[str, Any] = {}  # each run's median round, with every round's time
        self.rounds: dict[str, list[dict[str, Any]]] = {}

    def wanted(self, name: str) -> bool:
        return self.only is None or name in self.only

    def measure(self, name: str, argv: list[str], home: dict[str, str], **kw: Any) -> None:
        if not self.wanted(name):
            return
        if "since" not in kw:
            drop_cached(self.server.root)
        start_wall, offset = kw.pop("since", time.time()), self.log.stat().st_size
        answered: list[float] = []
        seconds = kw.pop("before_s", 0.0) + timed_boot(
            argv,
            self.port,
            self.model,
            self.log,
            signal.SIGINT,
            None,
            kw.pop("ready", RESTORED),
            extra_env={**home, **kw.pop("env", {})},
            after=lambda: answered.append(time.time()),
        )
        text = log_since(self.log, offset)  # (vLLM prints a traceback when stopped: unchecked)
        result = {
            "first_answer_s": seconds,
            "phases_s": phases(text),
            "before_first_answer": self.server.sent_between(start_wall, answered[0]),
            "cold_booted": "cold boot ready" in text,
            "lazy": "lazily from" in text,
            **kw.pop("extra", {}),
        }
        print(f"{name}: {seconds:.2f} s, {result}")
        rounds = self.rounds.setdefault(name, [])
        rounds.append(result)
        ordered = sorted(rounds, key=lambda r: float(r["first_answer_s"]))
        median = ordered[(len(ordered) - 1) // 2]  # a round that happened (lower median)
        self.results[name] = {**median, "rounds_s": [r["first_answer_s"] for r in rounds]}


def runs(work: Path, flags: list[str], runner: Runner, rounds: int) -> dict[str, Any]:
    """(a) once (tens of seconds, far from the rest), then `rounds` rounds of every other run
    in turn, each on fresh homes: results hold each run's median round."""
    runner.measure(
        "a_cold_boot",
        fastboot("serve", *flags, "--fastboot-no-snapshot"),
        fresh_home(work, "fresh-a"),
        ready=None,
    )
    for _ in range(rounds):
        restore_runs(work, flags, runner)
    return runner.results


def restore_runs(work: Path, flags: list[str], runner: Runner) -> None:
    server = runner.server
    remote = ["--fastboot-snapshot-remote", server.url]
    if runner.wanted("b_full_pull_then_restore"):
        home = fresh_home(work, "fresh-b")
        drop_cached(server.root)
        start, start_wall = time.monotonic(), time.time()
        subprocess.run(
            fastboot(
                "image", "unpack-snapshot", f"snap-{snapshot_id(work)}", "--remote", server.url
            ),
            env={**os.environ, **home},
            check=True,
            capture_output=True,
        )
        pulled = time.monotonic() - start
        runner.measure(
            "b_full_pull_then_restore",
            fastboot("serve", *flags),
            home,
            before_s=pulled,
            since=start_wall,
            extra={"pull_s": pulled},
        )
    home = fresh_home(work, "fresh-c")
    runner.measure("c_lazy_fetched", fastboot("serve", *flags, *remote), home)
    runner.measure("c_second_replica_same_host", fastboot("serve", *flags, *remote), home)
    mount = {"FASTBOOT_SNAPSHOT_FETCH": "mount"}
    runner.measure(
        "c_lazy_mount_mapped",
        fastboot("serve", *flags, *remote),
        fresh_home(work, "fresh-d"),
        env=mount,
    )
    runner.measure(
        "c_lazy_mount_copied",
        fastboot("serve", *flags, *remote),
        fresh_home(work, "fresh-e"),
        env={**mount, "FASTBOOT_COPY_PAGES": "1"},
    )
    runner.measure(
        "c_lazy_mount_lazy_pages",
        fastboot("serve", *flags, *remote),
        fresh_home(work, "fresh-f"),
        env={**mount, "FASTBOOT_LAZY_PAGES": "1"},
    )


ENV_IMAGE = "env"


def env_host(work: Path, name: str) -> tuple[dict[str, str], Path]:
    """A host for the env-image runs: its own image store and snapshot directory, but the one
    FASTBOOT_HOME of them all, because the snapshot key names the env image's mountpoint
    ($FASTBOOT_HOME/mounts/<index>), which every host of a fleet has at the same path."""
    root = work / name
    shutil.rmtree(root, ignore_errors=True)
    (root / "tmp").mkdir(parents=True)
    home = {
        "FASTBOOT_HOME": str(work / "home"),
        "FASTBOOT_IMAGE_STORE": str(root / "images"),
        "TMPDIR": str(root / "tmp"),
    }
    return home, root / "snapshots"


def env_set_up(work: Path, flags: list[str], port: int, model: str, log: Path) -> dict[str, Any]:
    """Host A with the engine run from an env image (this virtual environment): build and push
    the image, cold boot from it (snapshot), push the snapshot."""
    home, snapshots = env_host(work, "env-a")
    store = ImageStore(Path(home["FASTBOOT_IMAGE_STORE"]))
    started = time.monotonic()
    ref = build(store, Path(sys.prefix), ENV_IMAGE, progress=False)
    out: dict[str, Any] = {"build_s": time.monotonic() - started, "image_bytes": ref.total_bytes}
    store.push(ENV_IMAGE, work / "served")
    argv = fastboot("serve", *flags, "--fastboot-env-image", ENV_IMAGE)
    argv += ["--fastboot-snapshot-dir", str(snapshots)]
    out["first_serve_s"] = timed_boot(
        argv, port, model, log, signal.SIGINT, snapshots, RESTORED, extra_env=home
    )
    (manifest,) = [m for m in Store(snapshots).list() if isinstance(m, Manifest)]
    out["snapshot"] = {"id": manifest.id, "bytes": manifest.total_bytes}
    out["push_line"] = push(manifest.id, work / "served", home, snapshots)["line"]
    return out


def env_runs(work: Path, flags: list[str], runner: Runner) -> dict[str, Any]:
    """(a) and (c) with the env image also remote and uncached on the fresh host (its ref and
    index pulled first, timed with the run)."""
    url = runner.server.url
    for name, extra in (
        ("env_a_cold_boot", ["--fastboot-no-snapshot"]),
        ("env_c_lazy_fetched", ["--fastboot-snapshot-remote", url]),
    ):
        home, snapshots = env_host(work, name)
        started = time.monotonic()
        subprocess.run(
            fastboot("image", "pull", ENV_IMAGE, "--remote", url),
            env={**os.environ, **home},
            check=True,
            capture_output=True,
        )
        argv = fastboot("serve", *flags, "--fastboot-env-image", ENV_IMAGE, *extra)
        argv += ["--fastboot-snapshot-dir", str(snapshots)]
        ready = None if name == "env_a_cold_boot" else RESTORED
        runner.measure(name, argv, home, ready=ready, before_s=time.monotonic() - started)
    return runner.results


#: fastboot's DEBUG lines for the steps of a restore (seconds).
PHASES = {
    "fetch": r"fetched snapshot \w+ from \S+: .* in ([\d.]+) s",
    "mount": r"mounted image snap-\w+ \(\w+\) at \S+ in ([\d.]+) s",
    "verify": r"verified \d+ files in ([\d.]+) s",
    "criu_restore": r"criu restore took ([\d.]+) s",
    "engine_answered": r"restored engine answered in ([\d.]+) s",
    "oracle": r"oracle matched in ([\d.]+) s",
}


def phases(text: str) -> dict[str, float]:
    """Where a run's restore went, from its log (the last restore's lines)."""
    found = {}
    for name, pattern in PHASES.items():
        if matches := re.findall(pattern, text):
            found[name] = float(matches[-1])
    return found


def snapshot_id(work: Path) -> str:
    (manifest,) = [
        m for m in Store(work / "host-a" / "snapshots").list() if isinstance(m, Manifest)
    ][:1]
    return manifest.id


def summarise(out: dict[str, Any]) -> None:
    runs, total = out["runs"], out["snapshot"]["bytes"]
    full = runs.get("b_full_pull_then_restore", {}).get("first_answer_s", float("nan"))
    print(
        f"\nsnapshot {out['snapshot']['id'][:12]}: {total / 1e9:.2f} GB of files, "
        f"{out['push']['stored_gb']:.2f} GB stored"
    )
    print(
        f"{'run':28} {'first answer':>12} {'vs full pull':>12} {'fetched':>10} {'of snapshot':>11}"
    )
    for name, run in runs.items():
        fetched = run["before_first_answer"]["bytes"]
        run["speedup_vs_full_pull"] = full / run["first_answer_s"]
        run["fetched_share_of_snapshot"] = fetched / total
        print(
            f"{name:28} {run['first_answer_s']:>10.2f} s {run['speedup_vs_full_pull']:>11.1f}x "
            f"{fetched / 1e6:>7.0f} MB {100 * fetched / total:>10.1f}%"
        )
    if "dedup" in out:
        print(
            f"second snapshot: {out['dedup']['files_gb']:.2f} GB of files, "
            f"{out['dedup']['new_gb']:.2f} GB new in the store"
        )


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(out["runs"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.barh(names, [out["runs"][n]["first_answer_s"] for n in names])
    left.set_xscale("log")
    left.set_xlabel("seconds to first answer (log)")
    right.barh(names, [out["runs"][n]["before_first_answer"]["bytes"] / 1e6 for n in names])
    right.set_xlabel("MB fetched before the first answer")
    right.set_yticks([])
    fig.suptitle(
        f"fresh host, {out['size']} model ({out['snapshot']['bytes'] / 1e9:.2f} GB snapshot)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
