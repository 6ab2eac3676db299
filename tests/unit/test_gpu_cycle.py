"""The order of CUDA steps around CRIU (fastboot.gpu.cycle) against a fake driver."""

from __future__ import annotations

import pytest

from fastboot.errors import CriuError, GpuRestoreError, SnapshotAbandonedError
from fastboot.gpu import cycle
from fastboot.gpu.checkpoint import CudaCheckpointer, ProcessState
from tests.unit.gpu_fakes import FakeDriver

PIDS = [101, 102, 103]


def test_before_dump_locks_all_before_checkpointing_any() -> None:
    fake = FakeDriver(PIDS)
    cycle.before_dump(PIDS, CudaCheckpointer(fake), timeout_ms=1234)
    assert fake.calls == [("lock", p) for p in PIDS] + [("checkpoint", p) for p in PIDS]
    assert set(fake.states.values()) == {ProcessState.CHECKPOINTED}
    assert fake.timeouts == [1234] * 3


def test_after_restore_restores_all_before_unlocking_any() -> None:
    fake = FakeDriver(PIDS)
    for p in PIDS:
        fake.states[p] = ProcessState.CHECKPOINTED
    cycle.after_restore(PIDS, CudaCheckpointer(fake))
    assert fake.calls == [("restore", p) for p in PIDS] + [("unlock", p) for p in PIDS]
    assert set(fake.states.values()) == {ProcessState.RUNNING}


def test_lock_timeout_unlocks_what_was_locked_and_abandons() -> None:
    fake = FakeDriver(PIDS)
    fake.fail[("lock", 103)] = "CUDA_ERROR_TIMEOUT"
    with pytest.raises(SnapshotAbandonedError, match=r"pid 103 timed out.*abandoned") as e:
        cycle.before_dump(PIDS, CudaCheckpointer(fake), timeout_ms=50)
    assert e.value.step == "lock"
    assert set(fake.states.values()) == {ProcessState.RUNNING}  # nothing left locked
    assert ("checkpoint", 101) not in fake.calls
    assert fake.calls[-2:] == [("unlock", 101), ("unlock", 102)]


def test_checkpoint_failure_restores_and_unlocks_everything() -> None:
    fake = FakeDriver(PIDS)
    fake.fail[("checkpoint", 102)] = "CUDA_ERROR_OUT_OF_MEMORY"
    with pytest.raises(SnapshotAbandonedError, match="OUT_OF_MEMORY"):
        cycle.before_dump(PIDS, CudaCheckpointer(fake))
    assert set(fake.states.values()) == {ProcessState.RUNNING}
    assert ("restore", 101) in fake.calls and ("restore", 102) not in fake.calls


def test_abandon_that_cannot_give_back_says_restart() -> None:
    fake = FakeDriver(PIDS)
    fake.fail[("lock", 102)] = "CUDA_ERROR_TIMEOUT"
    fake.fail[("unlock", 101)] = "CUDA_ERROR_ILLEGAL_STATE"
    with pytest.raises(SnapshotAbandonedError, match="putting the GPU state back also failed"):
        cycle.before_dump(PIDS, CudaCheckpointer(fake))
    assert fake.states[101] == ProcessState.LOCKED


def test_failed_restore_is_a_cold_boot_error_and_unlocks_nothing() -> None:
    fake = FakeDriver(PIDS)
    for p in PIDS:
        fake.states[p] = ProcessState.CHECKPOINTED
    fake.fail[("restore", 102)] = "CUDA_ERROR_INVALID_DEVICE"
    with pytest.raises(GpuRestoreError, match="boot cold"):
        cycle.after_restore(PIDS, CudaCheckpointer(fake))
    assert not any(step == "unlock" for step, _ in fake.calls)


def test_failed_unlock_after_restore_is_a_cold_boot_error() -> None:
    fake = FakeDriver(PIDS)
    for p in PIDS:
        fake.states[p] = ProcessState.CHECKPOINTED
    fake.fail[("unlock", 103)] = "CUDA_ERROR_ILLEGAL_STATE"
    with pytest.raises(GpuRestoreError, match="kill the restored tree and boot cold") as e:
        cycle.after_restore(PIDS, CudaCheckpointer(fake))
    assert (e.value.pid, e.value.step) == (103, "unlock")


def test_dump_with_gpu_runs_dump_between_checkpoint_and_nothing_after() -> None:
    fake = FakeDriver(PIDS)
    seen: list[set[ProcessState]] = []
    cycle.dump_with_gpu(
        PIDS, lambda: seen.append(set(fake.states.values())), CudaCheckpointer(fake)
    )
    assert seen == [{ProcessState.CHECKPOINTED}]
    assert fake.calls[-1] == ("checkpoint", 103)


def test_failed_dump_gives_the_gpu_back_and_reraises() -> None:
    fake = FakeDriver(PIDS)

    def dump() -> None:
        raise CriuError("dump", "Can't dump nvidia fd")

    with pytest.raises(CriuError, match="Can't dump"):
        cycle.dump_with_gpu(PIDS, dump, CudaCheckpointer(fake))
    assert set(fake.states.values()) == {ProcessState.RUNNING}


def test_lock_timeout_never_calls_dump() -> None:
    fake = FakeDriver(PIDS)
    fake.fail[("lock", 101)] = "CUDA_ERROR_TIMEOUT"
    dumped: list[bool] = []
    with pytest.raises(SnapshotAbandonedError):
        cycle.dump_with_gpu(PIDS, lambda: dumped.append(True), CudaCheckpointer(fake))
    assert dumped == []


def test_restore_with_gpu_uses_the_pids_restore_returned() -> None:
    fake = FakeDriver([201, 202])
    for p in (201, 202):
        fake.states[p] = ProcessState.CHECKPOINTED
    assert cycle.restore_with_gpu(lambda: [201, 202], CudaCheckpointer(fake)) == [201, 202]
    assert fake.states == {201: ProcessState.RUNNING, 202: ProcessState.RUNNING}


def test_restore_onto_other_gpus_passes_the_uuid_pairs_for_every_process() -> None:
    fake = FakeDriver(PIDS)
    for p in PIDS:
        fake.states[p] = ProcessState.CHECKPOINTED
    pairs = cycle.uuid_pairs(["GPU-a", "GPU-b"], ["GPU-c", "GPU-b"])
    assert pairs == [("GPU-a", "GPU-c"), ("GPU-b", "GPU-b")]
    cycle.after_restore(PIDS, CudaCheckpointer(fake), pairs)
    assert fake.pairs == [tuple(pairs)] * 3
    assert cycle.uuid_pairs(["GPU-a"], ["GPU-a"]) == []  # the same GPUs: no remap
    assert cycle.uuid_pairs(["GPU-a"], ["GPU-a", "GPU-b"]) == []  # refused by the fingerprint
    assert cycle.uuid_pairs([], []) == []  # a CPU snapshot
