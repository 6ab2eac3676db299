"""A fake CUDA checkpoint driver that follows the driver's state machine (for tests/unit)."""

from __future__ import annotations

from collections.abc import Sequence

from fastboot.gpu.checkpoint import DriverCallError, ProcessState


class FakeDriver:
    """Every pid starts RUNNING. `fail[(step, pid)] = code` makes that call fail;
    `lie[(step, pid)] = state` makes it succeed but leave the process in `state`."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.states = {pid: ProcessState.RUNNING for pid in pids}
        self.calls: list[tuple[str, int]] = []
        self.fail: dict[tuple[str, int], str] = {}
        self.lie: dict[tuple[str, int], ProcessState] = {}
        self.timeouts: list[int] = []
        self.pairs: list[tuple[tuple[str, str], ...]] = []

    def _step(self, step: str, pid: int, need: ProcessState, then: ProcessState) -> None:
        self.calls.append((step, pid))
        if code := self.fail.get((step, pid)):
            raise DriverCallError(code)
        if pid not in self.states:
            raise DriverCallError("CUDA_ERROR_INVALID_VALUE")
        if self.states[pid] != need:
            raise DriverCallError("CUDA_ERROR_ILLEGAL_STATE")
        self.states[pid] = self.lie.get((step, pid), then)

    def lock(self, pid: int, timeout_ms: int) -> None:
        self.timeouts.append(timeout_ms)
        self._step("lock", pid, ProcessState.RUNNING, ProcessState.LOCKED)

    def checkpoint(self, pid: int) -> None:
        self._step("checkpoint", pid, ProcessState.LOCKED, ProcessState.CHECKPOINTED)

    def restore(self, pid: int, gpu_pairs: Sequence[tuple[str, str]] = ()) -> None:
        self.pairs.append(tuple(gpu_pairs))
        self._step("restore", pid, ProcessState.CHECKPOINTED, ProcessState.LOCKED)

    def unlock(self, pid: int) -> None:
        self._step("unlock", pid, ProcessState.LOCKED, ProcessState.RUNNING)

    def state(self, pid: int) -> ProcessState:
        if pid not in self.states:
            raise DriverCallError("CUDA_ERROR_INVALID_VALUE")
        return self.states[pid]

    def steps(self) -> list[tuple[str, int]]:
        return list(self.calls)
