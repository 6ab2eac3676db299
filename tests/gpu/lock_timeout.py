"""GPU check of the lock timeout: a busy process is not snapshotted and keeps running.

    python tests/gpu/lock_timeout.py [--json PATH]

A child process (torch) launches matrix products back to back for about 8 seconds. While it
is busy, this script asks fastboot to checkpoint it with a 200 ms lock timeout
(`fastboot.gpu.cycle.before_dump`). The driver cannot drain that much queued work in time, so
fastboot must raise `SnapshotAbandonedError` with the driver's timeout code, leave the process
RUNNING, and the child must finish its work with the right answer. Then a second lock, after
the child is idle, must succeed (and is undone), which shows the first failure was the timeout.

Exit codes as checkpoint_roundtrip.py: 0 passed, 1 a check failed, 2 set-up missing,
77 no GPU here (a dry run).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoint_roundtrip import (  # noqa: E402
    FAILED,
    NO_GPU,
    SETUP,
    have_gpu,
    pid_alive,
    report,
    wait_for,
)

LOCK_TIMEOUT_MS = 200

CHILD = r"""
import json, os, sys, time
import torch
work = sys.argv[1]
torch.backends.cuda.matmul.allow_tf32 = False  # fp32 products: slow enough to queue up work
dev = torch.device("cuda")
a = torch.randn(8192, 8192, device=dev)
acc = torch.zeros(8192, 8192, device=dev)
torch.cuda.synchronize()
open(os.path.join(work, "busy"), "w").close()
launched, start = 0, time.monotonic()
while time.monotonic() - start < 8.0:
    acc.add_(a @ a)  # each launch blocks once the queue is full: the GPU stays busy throughout
    launched += 1
torch.cuda.synchronize()
want = (a @ a) * launched
err = float(((acc - want).abs().max() / want.abs().max()).item())
with open(os.path.join(work, "done.tmp"), "w") as fh:
    json.dump({"launched": launched, "relative_error": err}, fh)
os.rename(os.path.join(work, "done.tmp"), os.path.join(work, "done"))
while not os.path.exists(os.path.join(work, "exit")):
    time.sleep(0.05)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    result: dict[str, Any] = {"lock_timeout_ms": LOCK_TIMEOUT_MS, "passed": False}

    def finish(code: int, message: str) -> int:
        print(json.dumps(result, indent=2))
        return report(result, code, message, args.json)

    if why := have_gpu():
        return finish(NO_GPU, f"no GPU: {why}; dry run, nothing was locked")
    from fastboot.errors import FastbootError, SnapshotAbandonedError
    from fastboot.gpu import cycle
    from fastboot.gpu.checkpoint import CudaCheckpointer, ProcessState

    if os.geteuid() != 0:
        return finish(SETUP, "locking another process's CUDA work needs root (or the same user)")
    try:
        gpu = CudaCheckpointer()
    except FastbootError as exc:
        return finish(SETUP, str(exc))

    work = Path(tempfile.mkdtemp(prefix="fastboot-gpu-lock-"))
    (work / "child.py").write_text(CHILD)
    child = subprocess.Popen(
        [sys.executable, str(work / "child.py"), str(work)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    alive = functools.partial(pid_alive, child.pid)
    try:
        wait_for(work / "busy", 120, alive)
        time.sleep(1.0)  # let the launch queue fill: the lock must meet queued work
        start = time.monotonic()
        try:
            cycle.before_dump([child.pid], gpu, LOCK_TIMEOUT_MS)
        except SnapshotAbandonedError as exc:
            result["busy_lock"] = {"abandoned": True, "code": exc.code, "message": str(exc)}
        else:
            result["busy_lock"] = {"abandoned": False}
            cycle.after_restore([child.pid], gpu)  # it was checkpointed: give its GPU back
        result["busy_lock"]["seconds"] = round(time.monotonic() - start, 3)
        result["state_after_busy_lock"] = gpu.state(child.pid).name
        wait_for(work / "done", 120, alive)
        result["child"] = json.loads((work / "done").read_text())

        start = time.monotonic()  # idle now: a lock must succeed at once
        gpu.lock(child.pid, LOCK_TIMEOUT_MS)
        result["idle_lock_s"] = round(time.monotonic() - start, 3)
        gpu.unlock(child.pid)
        result["state_after_idle_lock"] = gpu.state(child.pid).name

        checks = {
            "a busy process's lock timed out and the snapshot was abandoned": result["busy_lock"][
                "abandoned"
            ],
            "it was left RUNNING": result["state_after_busy_lock"] == ProcessState.RUNNING.name,
            "it finished its work correctly": result["child"]["relative_error"] < 1e-3,
            "an idle lock succeeded": result["state_after_idle_lock"] == ProcessState.RUNNING.name,
        }
        result["checks"] = checks
        if failed := [name for name, ok in checks.items() if not ok]:
            return finish(FAILED, "; ".join(f"not: {name}" for name in failed))
        result["passed"] = True
        return finish(0, "busy lock abandoned after its timeout, process ran on; idle lock worked")
    except (FastbootError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        if child.poll() is not None and child.stdout is not None:
            result["child_output"] = child.stdout.read()[-2000:].decode(errors="replace")
        return finish(FAILED, f"{type(exc).__name__}: {exc}")
    finally:
        (work / "exit").touch()
        if pid_alive(child.pid):
            os.kill(child.pid, 9)
        child.wait(timeout=30)
        subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    sys.exit(main())
