"""CudaCheckpointer against a fake driver, and cuda_pids() against a fake /proc."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fastboot.errors import GpuError, GpuRestoreError, SnapshotAbandonedError
from fastboot.gpu.checkpoint import (
    CudaCheckpointer,
    CudaDriver,
    ProcessState,
    cuda_pids,
    nvidia_fds,
)
from tests.unit.gpu_fakes import FakeDriver


def test_full_cycle_moves_through_every_state() -> None:
    fake = FakeDriver([7])
    gpu = CudaCheckpointer(fake)
    seen = [gpu.state(7)]
    for step in (
        lambda: gpu.lock(7, 500),
        lambda: gpu.checkpoint(7),
        lambda: gpu.restore(7),
        lambda: gpu.unlock(7),
    ):
        step()
        seen.append(gpu.state(7))
    assert seen == [
        ProcessState.RUNNING,
        ProcessState.LOCKED,
        ProcessState.CHECKPOINTED,
        ProcessState.LOCKED,
        ProcessState.RUNNING,
    ]
    assert fake.timeouts == [500]


@pytest.mark.parametrize("code", ["CUDA_ERROR_TIMEOUT", "CUDA_ERROR_NOT_READY"])
def test_lock_timeout_is_a_clear_abandon(code: str) -> None:
    fake = FakeDriver([7])
    fake.fail[("lock", 7)] = code
    with pytest.raises(SnapshotAbandonedError, match=r"timed out after 250 ms.*keeps running") as e:
        CudaCheckpointer(fake).lock(7, 250)
    assert (e.value.pid, e.value.step, e.value.code) == (7, "lock", code)
    assert fake.states[7] == ProcessState.RUNNING


def test_lock_other_failure_names_the_code() -> None:
    fake = FakeDriver([7])
    fake.fail[("lock", 7)] = "CUDA_ERROR_NOT_SUPPORTED"
    with pytest.raises(SnapshotAbandonedError, match=r"CUDA_ERROR_NOT_SUPPORTED.*fastboot doctor"):
        CudaCheckpointer(fake).lock(7, 250)


def test_success_that_leaves_a_wrong_state_is_caught() -> None:
    fake = FakeDriver([7])
    fake.lie[("checkpoint", 7)] = ProcessState.FAILED
    gpu = CudaCheckpointer(fake)
    gpu.lock(7, 100)
    with pytest.raises(SnapshotAbandonedError, match="pid 7 is FAILED, not CHECKPOINTED"):
        gpu.checkpoint(7)


def test_restore_failure_says_cold_boot() -> None:
    fake = FakeDriver([7])
    fake.states[7] = ProcessState.CHECKPOINTED
    fake.fail[("restore", 7)] = "CUDA_ERROR_OUT_OF_MEMORY"
    with pytest.raises(GpuRestoreError, match=r"OUT_OF_MEMORY.*boot cold"):
        CudaCheckpointer(fake).restore(7)


def test_restore_passes_uuid_pairs() -> None:
    fake = FakeDriver([7])
    fake.states[7] = ProcessState.CHECKPOINTED
    CudaCheckpointer(fake).restore(7, [("GPU-a", "GPU-b")])
    assert fake.pairs == [(("GPU-a", "GPU-b"),)]


def test_state_of_unknown_pid_is_gpu_error() -> None:
    with pytest.raises(GpuError, match="cannot read the CUDA state of pid 99"):
        CudaCheckpointer(FakeDriver([7])).state(99)


def test_real_driver_without_libcuda_gives_install_hint() -> None:
    # cuda-bindings is installed in the dev venv; libcuda.so is not (no driver on this host).
    from fastboot.errors import DependencyError

    pytest.importorskip("cuda.bindings", reason="cuda-bindings is part of the dev venv")
    if Path("/dev/nvidiactl").exists():
        pytest.skip("this host has an NVIDIA driver")
    gpu = CudaCheckpointer(CudaDriver())
    with pytest.raises(DependencyError, match=r"libcuda cannot be loaded.*fastboot\[gpu\]"):
        gpu.state(os.getpid())


def _fake_proc(root: Path, pid: int, maps: str, fds: dict[str, str]) -> None:
    base = root / str(pid)
    (base / "fd").mkdir(parents=True)
    (base / "maps").write_text(maps)
    for fd, target in fds.items():
        os.symlink(target, base / "fd" / fd)


def test_cuda_pids_by_maps_or_device_files(tmp_path: Path) -> None:
    lib = "7f00-7f10 r-xp 0 08:01 12 /usr/lib/x86_64-linux-gnu/libcuda.so.580.65.06\n"
    plain = "7f00-7f10 r-xp 0 08:01 12 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
    _fake_proc(tmp_path, 10, plain, {"0": "/dev/null"})  # API server: no CUDA
    _fake_proc(tmp_path, 11, lib, {})  # engine core after checkpoint: mapping only
    _fake_proc(tmp_path, 12, plain, {"3": "/dev/nvidiactl", "4": "/dev/nvidia0"})
    _fake_proc(tmp_path, 13, plain, {"5": "/dev/nvidia-uvm"})
    # 14 exited between listing the tree and looking: no entry at all
    assert cuda_pids([13, 10, 11, 12, 14], proc=tmp_path) == (11, 12, 13)
    assert nvidia_fds(12, proc=tmp_path) == ["/dev/nvidia0", "/dev/nvidiactl"]
    assert nvidia_fds(10, proc=tmp_path) == []


def test_cuda_pids_of_this_cpu_process_is_empty() -> None:
    assert cuda_pids([os.getpid()]) == ()
