"""CUDA checkpoint/restore of other processes through the driver API.

The driver (>= 570) can move a process's device memory into that process's host memory and
drop its GPU references (checkpoint), and put it back (restore), while CRIU saves the process
in between. Each process moves through the driver's states:

    RUNNING --lock--> LOCKED --checkpoint--> CHECKPOINTED --restore--> LOCKED --unlock--> RUNNING

A lock with a timeout that expires leaves the process RUNNING. `CudaCheckpointer` checks the
state after every step, so a driver that returned success but left the process elsewhere is
caught here rather than by CRIU or by the engine's first request.

The real `Driver` wraps cuda-bindings (`from cuda.bindings import driver`), imported on first
use; tests pass a fake. Driver errors become `fastboot.errors.GpuError` here and nowhere else.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from fastboot.errors import DependencyError, GpuError, GpuRestoreError, SnapshotAbandonedError

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'fastboot[gpu]' (cuda-bindings >= 12.9) and an NVIDIA driver >= 570"


class ProcessState(enum.IntEnum):
    """CUprocessState: the values match the driver's enum."""

    RUNNING = 0
    LOCKED = 1
    CHECKPOINTED = 2
    FAILED = 3
    CHECKPOINTING = 4
    RESTORING = 5


class DriverCallError(GpuError):
    """A cuCheckpointProcess* call returned something other than CUDA_SUCCESS (internal: the
    checkpointer turns it into a GpuError)."""

    def __init__(self, code: str) -> None:
        super().__init__(code, code=code)


#: Codes with which a lock whose timeout expired returns (the process stays RUNNING).
LOCK_TIMEOUT_CODES = frozenset({"CUDA_ERROR_TIMEOUT", "CUDA_ERROR_NOT_READY"})


class Driver(Protocol):
    """The five driver calls, raising DriverCallError(CUresult name) on failure."""

    def lock(self, pid: int, timeout_ms: int) -> None: ...

    def checkpoint(self, pid: int) -> None: ...

    def restore(self, pid: int, gpu_pairs: Sequence[tuple[str, str]] = ()) -> None: ...

    def unlock(self, pid: int) -> None: ...

    def state(self, pid: int) -> ProcessState: ...


class CudaDriver:
    """Driver over cuda-bindings. cuInit(0) runs once, before the first call: restore needs it
    (or persistence mode) in the calling process."""

    def __init__(self) -> None:
        try:
            from cuda.bindings import driver
        except ImportError as exc:
            raise DependencyError(f"cuda-bindings is not installed; {INSTALL_HINT}") from exc
        if not hasattr(driver, "cuCheckpointProcessLock"):
            raise DependencyError(f"this cuda-bindings lacks the checkpoint API; {INSTALL_HINT}")
        self._d: Any = driver
        self._initialised = False

    def _call(self, result: Any) -> Any:
        """Unpack (CUresult, *values); raise DriverCallError unless CUDA_SUCCESS."""
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self._d.CUresult.CUDA_SUCCESS:
            raise DriverCallError(getattr(err, "name", str(err)))
        return values[0] if values else None

    def _init(self) -> None:
        if self._initialised:
            return
        try:
            result = self._d.cuInit(0)
        except Exception as exc:  # the binding raises when libcuda.so cannot be loaded
            raise DependencyError(f"libcuda cannot be loaded ({exc}); {INSTALL_HINT}") from exc
        self._call(result)
        self._initialised = True

    def lock(self, pid: int, timeout_ms: int) -> None:
        self._init()
        args = self._d.CUcheckpointLockArgs()
        args.timeoutMs = timeout_ms
        self._call(self._d.cuCheckpointProcessLock(pid, args))

    def checkpoint(self, pid: int) -> None:
        self._init()
        self._call(self._d.cuCheckpointProcessCheckpoint(pid, None))

    def restore(self, pid: int, gpu_pairs: Sequence[tuple[str, str]] = ()) -> None:
        self._init()
        args = None
        if gpu_pairs:
            args = self._d.CUcheckpointRestoreArgs()
            pairs = []
            for old, new in gpu_pairs:
                pair = self._d.CUcheckpointGpuPair()
                pair.oldUuid = _cuuuid(self._d, old)
                pair.newUuid = _cuuuid(self._d, new)
                pairs.append(pair)
            args.gpuPairs = pairs
            args.gpuPairsCount = len(pairs)
        self._call(self._d.cuCheckpointProcessRestore(pid, args))

    def unlock(self, pid: int) -> None:
        self._init()
        self._call(self._d.cuCheckpointProcessUnlock(pid, None))

    def state(self, pid: int) -> ProcessState:
        self._init()
        return ProcessState(int(self._call(self._d.cuCheckpointProcessGetState(pid))))


def _cuuuid(driver: Any, text: str) -> Any:
    """A CUuuid from NVML's "GPU-xxxxxxxx-xxxx-..." spelling (unverified on a GPU)."""
    raw = bytes.fromhex(text.removeprefix("GPU-").replace("-", ""))
    if len(raw) != 16:
        raise ValueError(f"not a GPU UUID: {text!r}")
    uuid = driver.CUuuid()
    # CUuuid.bytes is read-only in the binding; the struct is 16 plain bytes at getPtr().
    ctypes.memmove(uuid.getPtr(), raw, 16)
    return uuid


class CudaCheckpointer:
    """The checkpoint steps for one process at a time, each followed by a state check."""

    def __init__(self, driver: Driver | None = None) -> None:
        self._driver = driver if driver is not None else CudaDriver()

    def state(self, pid: int) -> ProcessState:
        try:
            return self._driver.state(pid)
        except DriverCallError as exc:
            raise GpuError(
                f"cannot read the CUDA state of pid {pid} ({exc.code}); is it still running, "
                "and does it hold a CUDA context? (`fastboot doctor` checks the driver)",
                pid,
                "state",
                exc.code,
            ) from exc

    def _expect(self, pid: int, step: str, want: ProcessState, error: type[GpuError]) -> None:
        got = self.state(pid)
        if got != want:
            raise error(
                f"after cuda {step} pid {pid} is {got.name}, not {want.name}; "
                "the driver did not do what it reported",
                pid,
                step,
                got.name,
            )

    def _step(
        self,
        pid: int,
        step: str,
        call: Callable[[], None],
        error: type[GpuError],
        advice: str,
        after: ProcessState,
    ) -> None:
        """One driver call for pid, then the state check. A failed call raises `error`:
        "cuda STEP of pid PID failed (CODE); ADVICE"."""
        try:
            call()
        except DriverCallError as exc:
            raise error(
                f"cuda {step} of pid {pid} failed ({exc.code}); {advice}", pid, step, exc.code
            ) from exc
        self._expect(pid, step, after, error)

    def lock(self, pid: int, timeout_ms: int) -> None:
        """RUNNING -> LOCKED: further CUDA calls of pid block. On timeout the process is left
        RUNNING and SnapshotAbandonedError says so."""

        def call() -> None:
            try:
                self._driver.lock(pid, timeout_ms)
            except DriverCallError as exc:
                if exc.code not in LOCK_TIMEOUT_CODES:
                    raise
                raise SnapshotAbandonedError(
                    f"cuda lock of pid {pid} timed out after {timeout_ms} ms (its CUDA work did "
                    "not drain); it keeps running and the snapshot is abandoned; quiesce the "
                    "engine first (no requests in flight) or raise the timeout",
                    pid,
                    "lock",
                    exc.code,
                ) from exc

        self._step(
            pid,
            "lock",
            call,
            SnapshotAbandonedError,
            "the snapshot is abandoned; check `fastboot doctor` (driver >= 570, same user or root)",
            ProcessState.LOCKED,
        )

    def checkpoint(self, pid: int) -> None:
        """LOCKED -> CHECKPOINTED: device memory moves into pid's host memory."""
        self._step(
            pid,
            "checkpoint",
            lambda: self._driver.checkpoint(pid),
            SnapshotAbandonedError,
            "the snapshot is abandoned; the host may lack memory for the device contents",
            ProcessState.CHECKPOINTED,
        )

    def restore(self, pid: int, gpu_pairs: Sequence[tuple[str, str]] = ()) -> None:
        """CHECKPOINTED -> LOCKED: device memory goes back (onto gpu_pairs' new GPUs if given)."""
        self._step(
            pid,
            "restore",
            lambda: self._driver.restore(pid, gpu_pairs),
            GpuRestoreError,
            "kill the restored tree and boot cold (same GPU model with enough free memory is "
            "required)",
            ProcessState.LOCKED,
        )

    def unlock(self, pid: int) -> None:
        """LOCKED -> RUNNING: pid's CUDA calls proceed."""
        self._step(
            pid,
            "unlock",
            lambda: self._driver.unlock(pid),
            GpuError,
            "its CUDA calls stay blocked, so kill it and boot cold",
            ProcessState.RUNNING,
        )


def _holds_cuda(pid: int, proc: Path) -> bool:
    base = proc / str(pid)
    try:
        with open(base / "maps", errors="replace") as maps:
            if any("libcuda.so" in line for line in maps):
                return True
    except OSError:
        return False
    return bool(nvidia_fds(pid, proc))


def nvidia_fds(pid: int, proc: Path = Path("/proc")) -> list[str]:
    """The /dev/nvidia* files pid has open (CRIU cannot dump these: none may remain after a
    cuda checkpoint)."""
    found = []
    try:
        entries = list((proc / str(pid) / "fd").iterdir())
    except OSError:
        return []
    for entry in entries:
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith("/dev/nvidia"):
            found.append(target)
    return sorted(found)


def cuda_pids(tree_pids: Iterable[int], proc: Path = Path("/proc")) -> tuple[int, ...]:
    """The pids of tree_pids that hold (or held) a CUDA context, in ascending order.

    A process counts when it maps libcuda.so or has a /dev/nvidia* file open. The mapping stays
    after a cuda checkpoint and after a CRIU restore, so this also finds the processes to
    restore in a restored tree. `proc` is for tests.
    """
    return tuple(sorted({pid for pid in tree_pids if _holds_cuda(pid, proc)}))
