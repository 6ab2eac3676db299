"""The order of the CUDA steps around CRIU, for a tree with one or more CUDA processes.

    dump:     [quiesce] -> lock all (timeout) -> checkpoint all -> criu dump
    restore:  criu restore (tree running) -> cuda restore all -> unlock all -> [resume]

Every process is locked before any is checkpointed: with tensor parallelism the ranks wait on
each other in NCCL, so checkpointing one while another still runs could hang. The CUDA steps
run while the tree is *not* frozen by CRIU: the driver does the copying on a thread inside the
target process (see `cuCheckpointProcessGetRestoreThreadId`), which must be able to run. So
`criu restore` must leave the tree running (no `--leave-stopped`) before `after_restore`.

Failure handling:
- before the dump: whatever was checkpointed is restored and whatever was locked is unlocked,
  so the engine keeps serving, and `SnapshotAbandonedError` is raised.
- CRIU dump fails (`dump_with_gpu`): CRIU resumes the tree, which is then CHECKPOINTED; the
  CUDA state is put back the same way and the CRIU error is re-raised.
- after a restore: `GpuRestoreError`; the caller kills the restored tree and boots cold.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from fastboot.errors import GpuError, GpuRestoreError, SnapshotAbandonedError
from fastboot.gpu.checkpoint import CudaCheckpointer, ProcessState

logger = logging.getLogger(__name__)

#: How long a lock may wait for a process's in-flight CUDA work (a quiesced engine has none).
DEFAULT_LOCK_TIMEOUT_MS = 10_000


def _give_back(gpu: CudaCheckpointer, pids: Sequence[int]) -> list[str]:
    """Best effort: bring pids back to RUNNING from LOCKED or CHECKPOINTED. Returns what failed."""
    failed = []
    for pid in pids:
        try:
            state = gpu.state(pid)
            if state == ProcessState.CHECKPOINTED:
                gpu.restore(pid)
                state = ProcessState.LOCKED
            if state == ProcessState.LOCKED:
                gpu.unlock(pid)
        except GpuError as exc:
            logger.error("could not give pid %d its GPU back: %s", pid, exc)
            failed.append(f"pid {pid}: {exc}")
    return failed


def _abandon(
    gpu: CudaCheckpointer, touched: Sequence[int], exc: GpuError
) -> SnapshotAbandonedError:
    failed = _give_back(gpu, touched)
    if failed:
        return SnapshotAbandonedError(
            f"{exc}; putting the GPU state back also failed ({'; '.join(failed)}): "
            "the engine cannot serve, restart it",
            exc.pid,
            exc.step,
            exc.code,
        )
    if isinstance(exc, SnapshotAbandonedError):
        return exc
    return SnapshotAbandonedError(
        f"{exc}; the engine keeps running and the snapshot is abandoned",
        exc.pid,
        exc.step,
        exc.code,
    )


def before_dump(
    pids: Sequence[int], gpu: CudaCheckpointer, timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS
) -> None:
    """Lock every pid, then checkpoint every pid; afterwards none holds GPU memory or device
    files and CRIU may dump the tree. On any failure the pids are put back to RUNNING and
    SnapshotAbandonedError is raised."""
    touched: list[int] = []
    started = time.monotonic()
    try:
        for pid in pids:
            touched.append(pid)
            gpu.lock(pid, timeout_ms)
        locked = time.monotonic()
        for pid in pids:
            gpu.checkpoint(pid)
    except GpuError as exc:
        raise _abandon(gpu, touched, exc) from exc
    done = time.monotonic()
    logger.info(
        "cuda checkpoint of %d process(es) in %.2f s (lock %.2f s)",
        len(pids),
        done - started,
        locked - started,
    )


def after_restore(
    pids: Sequence[int], gpu: CudaCheckpointer, gpu_pairs: Sequence[tuple[str, str]] = ()
) -> None:
    """Restore every pid's GPU state (onto other GPUs by gpu_pairs: (old UUID, new UUID)), then
    unlock every pid. Raises GpuRestoreError (the caller kills the tree and boots cold)."""
    started = time.monotonic()
    try:
        for pid in pids:
            gpu.restore(pid, gpu_pairs)
        for pid in pids:
            gpu.unlock(pid)
    except GpuRestoreError:
        raise
    except GpuError as exc:
        raise GpuRestoreError(
            f"{exc}; kill the restored tree and boot cold", exc.pid, exc.step, exc.code
        ) from exc
    logger.info("cuda restore of %d process(es) in %.2f s", len(pids), time.monotonic() - started)


def uuid_pairs(dumped: Sequence[str], here: Sequence[str]) -> list[tuple[str, str]]:
    """(old, new) UUID pairs for restoring onto this host's GPUs: the i-th GPU of the dump onto
    the i-th GPU here (the order CUDA enumerates them). [] when nothing moves, or when the
    counts differ (the fingerprint check refuses that snapshot before any restore)."""
    if len(dumped) != len(here) or list(dumped) == list(here):
        return []
    return list(zip(dumped, here, strict=True))


def dump_with_gpu(
    pids: Sequence[int],
    dump: Callable[[], None],
    gpu: CudaCheckpointer,
    timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS,
) -> None:
    """before_dump, then dump() (e.g. a closure over `fastboot.snapshot.criu.dump`). When dump()
    raises, CRIU has resumed the tree: its GPU state is put back before the error propagates."""
    before_dump(pids, gpu, timeout_ms)
    try:
        dump()
    except BaseException:
        failed = _give_back(gpu, pids)
        if failed:
            logger.error("after a failed dump the engine's GPU state is lost: %s", failed)
        raise


def restore_with_gpu(restore: Callable[[], Sequence[int]], gpu: CudaCheckpointer) -> Sequence[int]:
    """restore() (CRIU restore, tree left running; returns the restored CUDA pids as this
    process sees them, e.g. `cuda_pids(tree)`), then after_restore. Returns those pids."""
    pids = restore()
    after_restore(pids, gpu)
    return pids
