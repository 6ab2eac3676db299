"""GPU check of fastboot's CUDA checkpoint path: tensors + a CUDA graph survive dump/kill/restore.

    python tests/gpu/checkpoint_roundtrip.py [--gib N] [--json PATH]

A child process (torch) fills N GiB of device memory with seeded random data, captures a CUDA
graph, records checksums and the graph's output, then waits for a trigger file. This script
(no torch here) checkpoints it with fastboot's own code: `fastboot.gpu.cycle.dump_with_gpu`
(CudaCheckpointer lock -> checkpoint) around `fastboot.snapshot.criu.dump`; the dump kills the
child. It then runs `fastboot.snapshot.criu.restore`, `cycle.after_restore` (restore -> unlock),
triggers the child, and compares checksums and graph output; then kills that replica and
restores a second one from the same images, passing this GPU's UUID as an explicit (old, new)
pair, the path of a restore onto another GPU.

Exit codes: 0 passed, 1 a check failed, 2 set-up missing (criu, root, cuda-bindings),
77 no GPU here (a dry run: nothing was tried).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

NO_GPU, SETUP, FAILED = 77, 2, 1

CHILD = r"""
import hashlib, json, os, sys, time
import torch
work, gib = sys.argv[1], float(sys.argv[2])
torch.manual_seed(0)
dev = torch.device("cuda")
gen = torch.Generator(device=dev).manual_seed(1234)
weights = torch.randn(int(gib * (1 << 30)) // 4, device=dev, generator=gen)
a = torch.randn(1024, 1024, device=dev, generator=gen)
static_x = torch.randn(64, 1024, device=dev, generator=gen)

def f(x):
    return torch.relu(x @ a + 1.0) * 0.5

side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    for _ in range(3):
        f(static_x)
torch.cuda.current_stream().wait_stream(side)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    static_y = f(static_x)
torch.cuda.synchronize()
warmed_at = time.time()  # the cold start ends here; the checksums below are the check's own

def digest(t):
    data = t.detach().contiguous().view(torch.uint8).cpu()
    try:
        return hashlib.sha256(data.numpy().tobytes()).hexdigest()
    except Exception:  # no numpy: an exact-enough integer checksum
        ints = t.detach().contiguous().view(torch.int32).to(torch.int64)
        return str(int(ints.sum().item())) + ":" + str(int((ints * 31 % 1000003).sum().item()))

def state():
    graph.replay()
    torch.cuda.synchronize()
    return {"weights": digest(weights), "a": digest(a), "graph_out": digest(static_y),
            "graph_sum": float(static_y.double().sum().item())}

def write(name, data):
    tmp = os.path.join(work, name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh)
    os.rename(tmp, os.path.join(work, name))

write("before.json", dict(state(), warmed_at=warmed_at))
while not os.path.exists(os.path.join(work, "go")):
    time.sleep(0.05)
static_y.zero_()  # the replay must recompute it from the restored inputs
write("after.json", state())
"""


def gpu_memory_mib() -> list[int]:
    import pynvml

    pynvml.nvmlInit()
    try:
        return [
            int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used)
            // (1 << 20)
            for i in range(pynvml.nvmlDeviceGetCount())
        ]
    finally:
        pynvml.nvmlShutdown()


def report(result: dict[str, Any], code: int, message: str, json_path: Path | None) -> int:
    """Record the outcome in result, print it, write result as JSON; returns code (the exit)."""
    result["exit_code"], result["message"] = code, message
    print(("PASS: " if code == 0 else "FAIL: " if code == FAILED else "") + message)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    return code


def have_gpu() -> str | None:
    """None when a GPU is usable, else why not."""
    if not any(Path("/dev").glob("nvidia[0-9]*")):
        return "no /dev/nvidia* device"
    try:
        from fastboot.gpu.info import gpu_fields

        if not gpu_fields():
            return "NVML sees no GPU"
    except Exception as exc:
        return f"NVML: {exc}"
    return None


def wait_for(path: Path, timeout: float, alive: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if alive is not None and not alive():
            raise RuntimeError(f"child exited before writing {path.name}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path.name} did not appear within {timeout:.0f} s")
        time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def criu_log_tails(workdir: Path, lines: int = 30) -> dict[str, list[str]]:
    """For a failed run: each CRIU log's error lines, then its last lines (the logs go with the
    temp dir, and a lent GPU machine is given back after the call)."""
    tails = {}
    for log in sorted(workdir.rglob("*.log")):
        text = log.read_text(errors="replace").splitlines()
        errors = [ln for ln in text if "Error" in ln][:20]
        tails[str(log.relative_to(workdir))] = [*errors, "...", *text[-lines:]]
    return tails


def criu_check(criu: Any) -> list[str]:
    """What `criu check` says of this kernel (recorded, not required: the dump says the rest)."""
    try:
        return criu.check().splitlines()[-5:]
    except Exception as exc:
        return [f"criu check failed: {exc}"]


def drop_page_cache(images: Path) -> None:
    """Evict the image files' pages (only theirs; nothing host-wide), so a restore reads disk."""
    for path in images.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def reap(pid: int, timeout: float) -> None:
    """Wait until a killed restored replica is reaped (it is our child: we are its subreaper),
    so that its pid is free for the next restore."""
    deadline = time.monotonic() + timeout
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            raise RuntimeError(f"pid {pid} still alive {timeout:.0f} s after SIGKILL")
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=2.0, help="device memory to fill (GiB)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--cold", action="store_true", help="drop the images' pages from the page cache first"
    )
    args = parser.parse_args()
    result: dict[str, Any] = {"gib": args.gib, "passed": False, "cold_images": args.cold}

    def finish(code: int, message: str) -> int:
        return report(result, code, message, args.json)

    if why := have_gpu():
        return finish(NO_GPU, f"no GPU: {why}; dry run, nothing was checkpointed")
    from fastboot.errors import FastbootError
    from fastboot.gpu import cycle
    from fastboot.gpu.checkpoint import CudaCheckpointer, cuda_pids, nvidia_fds
    from fastboot.gpu.info import gpu_fields
    from fastboot.host.supervisor import become_subreaper
    from fastboot.snapshot import criu as criu_mod

    result["gpu"] = gpu_fields()
    if os.geteuid() != 0:
        return finish(SETUP, "CRIU needs root; run as root")
    try:
        criu = criu_mod.find_criu()
        gpu = CudaCheckpointer()
    except FastbootError as exc:
        return finish(SETUP, str(exc))
    result["criu"] = criu.version_text
    result["kernel"], result["criu_check"] = os.uname().release, criu_check(criu)

    become_subreaper()  # restored replicas are re-parented to us, and reaped here
    work = Path(tempfile.mkdtemp(prefix="fastboot-gpu-"))
    images, criu_work = work / "images", work / "criu"
    criu_work.mkdir()
    script = work / "child.py"
    script.write_text(CHILD)
    spawned_at = time.time()
    child = subprocess.Popen(
        [sys.executable, str(script), str(work), str(args.gib)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    restored_pid: int | None = None
    try:
        wait_for(work / "before.json", 180, lambda: child.poll() is None)
        before = json.loads((work / "before.json").read_text())
        result["cold_start_s"] = round(before.pop("warmed_at") - spawned_at, 3)
        stdio_pipe = os.readlink(f"/proc/{child.pid}/fd/1")
        pids = cuda_pids([child.pid])
        if pids != (child.pid,):
            return finish(FAILED, f"cuda_pids found {pids}, expected ({child.pid},)")
        result["mem_mib_running"] = gpu_memory_mib()

        timings: dict[str, float] = {}

        def dump() -> None:
            result["nvidia_fds_after_checkpoint"] = nvidia_fds(child.pid)
            result["mem_mib_checkpointed"] = gpu_memory_mib()
            timings["cuda_checkpoint_s"] = time.monotonic() - started
            dump_start = time.monotonic()
            criu_mod.dump(criu, child.pid, images, criu_work)
            timings["criu_dump_s"] = time.monotonic() - dump_start

        started = time.monotonic()
        cycle.dump_with_gpu(pids, dump, gpu)
        child.wait(timeout=30)
        result["mem_mib_after_kill"] = gpu_memory_mib()
        result["image_bytes"] = sum(p.stat().st_size for p in images.rglob("*") if p.is_file())
        result["restore_maps_pages"] = criu_mod.maps_pages(criu, images)

        # Two replicas of one snapshot, one after the other: the second passes the GPU's UUID
        # as an explicit (old, new) pair, the path a restore onto another GPU takes.
        uuids = result["gpu"].get("gpu_uuids") or []
        bad: list[str] = []
        for replica, pairs in ((1, []), (2, [(u, u) for u in uuids[:1]])):
            for name in ("go", "after.json"):
                (work / name).unlink(missing_ok=True)
            if args.cold:
                drop_page_cache(images)
            # the read end stays open until the end, so the restored child's prints never SIGPIPE
            _read_fd, write_fd = os.pipe()
            start = time.monotonic()
            replica_work = criu_work / f"replica{replica}"  # its own pidfile and log
            replica_work.mkdir()
            restored_pid = criu_mod.restore(criu, images, replica_work, stdio_pipe, write_fd)
            os.close(write_fd)
            timings[f"criu_restore_{replica}_s"] = time.monotonic() - start
            result[f"state_after_criu_restore_{replica}"] = gpu.state(restored_pid).name
            start = time.monotonic()
            cycle.after_restore(cuda_pids([restored_pid]), gpu, pairs)
            timings[f"cuda_restore_{replica}_s"] = time.monotonic() - start
            result[f"mem_mib_restored_{replica}"] = gpu_memory_mib()
            (work / "go").touch()
            wait_for(work / "after.json", 60, functools.partial(pid_alive, restored_pid))
            after = json.loads((work / "after.json").read_text())
            bad += [f"{k} (replica {replica})" for k in before if before[k] != after[k]]
            result[f"after_{replica}"] = after
            os.kill(restored_pid, 9)
            reap(restored_pid, 30)
            restored_pid = None
        result["gpu_pairs_used"] = len(uuids[:1])
        result["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        # the baseline of the same run: the child's own start (torch import, CUDA init, the
        # fill, the graph capture) against bringing it back (criu restore + cuda restore)
        back = timings["criu_restore_1_s"] + timings["cuda_restore_1_s"]
        result["restore_s"] = round(back, 3)
        result["cold_over_restore"] = round(result["cold_start_s"] / back, 2)
        result["before"] = before
        shown = {k: v for k, v in result.items() if k not in ("before", "passed")}
        shown = {k: v for k, v in shown.items() if not k.startswith("after_")}
        print(json.dumps(shown, indent=2))
        if bad:
            return finish(FAILED, f"changed across checkpoint/restore: {', '.join(bad)}")
        result["passed"] = True
        return finish(
            0, "tensors and CUDA graph output identical in two restores after checkpoint/kill"
        )
    except (FastbootError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        out = b""
        if child.poll() is not None and child.stdout is not None:
            out = child.stdout.read()[-2000:]
        result["child_output"] = out.decode(errors="replace")
        result["criu_logs"] = criu_log_tails(criu_work)
        for name, lines in result["criu_logs"].items():
            print(f"--- {name} (errors, then the last lines) ---\n" + "\n".join(lines))
        return finish(FAILED, f"{type(exc).__name__}: {exc}")
    finally:
        for pid in (child.pid, restored_pid):
            if pid and pid_alive(pid):
                os.kill(pid, 9)
        if child.poll() is None:
            child.wait(timeout=10)
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    sys.exit(main())
