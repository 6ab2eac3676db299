"""Health checks of buffer hosts, in two tiers (see docs/buffer.md).

A check is any `async (HostSpec) -> CheckResult` callable. A result is PASS, FAIL (the host is
quarantined with `detail` as the reason) or UNAVAILABLE (the check cannot run here: no NVML, no
dcgmi, a remote host; logged, not held against the host).

- short (before a host enters the buffer, and again when it is recycled; seconds): the agent's
  `/v1/health` and `/v1/resources`; CPU hosts: a real self-test of the engine runtime (import
  torch, a matmul checked against float64, under a deadline); GPU hosts: NVML state (ECC, retired
  pages, row remaps, temperature), critical Xids in the kernel log, and the same matmul on CUDA.
- assign (on every assignment, on the scale-up's path; milliseconds): the agent API, and on GPU
  hosts NVML and Xids. Not the self-test: it costs a fresh interpreter importing torch (1-2 s
  alone, 2.7-5 s on two loaded cores, measured in tests/integration/test_fleet_faults.py) and
  what it tests, the image's runtime, does not change while the host idles (the deep tier reruns
  it there). What does change in the meantime, a dead or cut-off agent or a GPU that logged an
  Xid, the assign tier sees.
- deep (idle buffer hosts, on a cadence; minutes): the above plus `dcgmi diag -r LEVEL` on GPU
  hosts where dcgmi is installed, and a larger matmul.

Local checks (self-test, NVML, Xid, dcgmi) need the agent on this machine (`HostSpec.local`); for
remote hosts they answer UNAVAILABLE until the agent API grows a self-test endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from fastboot.buffer.hosts import HostSpec
from fastboot.errors import FastbootError

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    """What a check concluded."""

    PASS = "pass"
    FAIL = "fail"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class CheckResult:
    """One check's verdict on one host."""

    check: str  #: check name, e.g. "agent", "selftest[cpu]", "nvml", "dcgm[r1]"
    outcome: Outcome  #: pass, fail or unavailable
    detail: str  #: what was seen; for a failure, the quarantine reason
    duration_s: float = 0.0  #: how long the check took

    @property
    def ok(self) -> bool:
        """False only for a failure: UNAVAILABLE is not held against the host."""
        return self.outcome is not Outcome.FAIL


HealthCheck = Callable[[HostSpec], Awaitable[CheckResult]]


async def _timed(name: str, run: Callable[[], Awaitable[tuple[Outcome, str]]]) -> CheckResult:
    start = time.perf_counter()
    outcome, detail = await run()
    return CheckResult(name, outcome, detail, time.perf_counter() - start)


class _LocalCheck:
    """A check that runs on this machine (a process, the kernel log): UNAVAILABLE, which is not
    held against the host, where the host's agent runs elsewhere. A subclass sets `name` and
    `needs` and writes `_run`."""

    #: The check's name in its results.
    name: str
    #: What needs the agent here, in the UNAVAILABLE detail (e.g. "Xid scan").
    needs: str

    async def __call__(self, spec: HostSpec) -> CheckResult:
        return await _timed(self.name, lambda: self._on_this_machine(spec))

    async def _on_this_machine(self, spec: HostSpec) -> tuple[Outcome, str]:
        if not spec.local:
            return Outcome.UNAVAILABLE, f"{self.needs} needs the agent on this machine"
        return await self._run(spec)

    async def _run(self, spec: HostSpec) -> tuple[Outcome, str]:
        raise NotImplementedError


class AgentCheck:
    """The agent answers `/v1/health` with status ok and `/v1/resources` with a usable host."""

    def __init__(self, timeout_s: float = 5.0, min_free_slots: int = 1) -> None:
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.min_free_slots = min_free_slots

    async def __call__(self, spec: HostSpec) -> CheckResult:
        return await _timed("agent", lambda: self._run(spec))

    async def _run(self, spec: HostSpec) -> tuple[Outcome, str]:
        headers = {"Authorization": f"Bearer {spec.token}"} if spec.token else {}
        try:
            async with aiohttp.ClientSession(timeout=self.timeout, headers=headers) as session:
                health = await self._get(session, spec.address + "/v1/health")
                resources = await self._get(session, spec.address + "/v1/resources")
        except _Refused as exc:
            return Outcome.FAIL, str(exc)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return Outcome.FAIL, f"agent at {spec.address} unreachable: {exc or type(exc).__name__}"
        if health.get("status") != "ok":
            return Outcome.FAIL, f"agent reports status {health.get('status')!r}, not 'ok'"
        kind = resources.get("kind")
        if kind != spec.kind:
            return Outcome.FAIL, f"agent reports a {kind} host; the config says {spec.kind}"
        free = int(resources.get("slots_free", 0) or 0)
        if free < self.min_free_slots:
            return Outcome.FAIL, f"agent has {free} free slots (< {self.min_free_slots})"
        if int(resources.get("memory_available_bytes", 0) or 0) <= 0:
            return Outcome.FAIL, "agent reports no available memory"
        if kind == "gpu" and not resources.get("gpus"):
            return Outcome.FAIL, "agent reports a GPU host without GPUs"
        return Outcome.PASS, f"agent ok, {free} free slots"

    @staticmethod
    async def _get(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
        async with session.get(url) as response:
            if response.status == 401:
                raise _Refused(f"agent at {url} rejected the token (401): check the token file")
            if response.status != 200:
                raise _Refused(f"GET {url} answered {response.status}")
            doc = await response.json(content_type=None)
            if not isinstance(doc, dict):
                raise _Refused(f"GET {url} answered something that is not a JSON object")
            return doc


class _Refused(FastbootError):
    """The agent answered, but not with a usable document."""


# The self-test runs in a fresh interpreter of the engine's runtime, so a broken torch install,
# a missing CUDA driver or a hung import shows up here and not in the first replica.
SELFTEST = """
import sys, time
start = time.perf_counter()
import torch
device, n = sys.argv[1], int(sys.argv[2])
gen = torch.Generator().manual_seed(0)
a = torch.randn(n, n, generator=gen)
b = torch.randn(n, n, generator=gen)
ref = a.double() @ b.double()
if device == "cuda":
    if not torch.cuda.is_available():
        print("torch sees no CUDA device"); sys.exit(4)
    x = (a.cuda() @ b.cuda()).cpu()
else:
    x = a @ b
err = float((x.double() - ref).abs().max() / ref.abs().max())
ok = bool(torch.isfinite(x).all()) and err < 1e-3
print(f"torch {torch.__version__} {device} matmul {n}x{n}: rel err {err:.1e} "
      f"in {time.perf_counter() - start:.2f} s")
sys.exit(0 if ok else 3)
"""


async def run_deadline(argv: Sequence[str], deadline_s: float) -> tuple[int | None, str]:
    """Run argv in its own session; (exit code, output) or (None, output) past the deadline, when
    the whole process group is killed and reaped."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(deadline_s):
            out, _ = await proc.communicate()
    except TimeoutError:
        await _kill_group(proc)
        return None, ""
    except asyncio.CancelledError:
        await _kill_group(proc)
        raise
    return proc.returncode, out.decode(errors="replace").strip()


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


class RuntimeSelfTest(_LocalCheck):
    """Import torch and multiply matrices in the engine's Python, under a deadline."""

    needs = "runtime self-test"

    def __init__(
        self,
        device: str = "cpu",
        size: int = 256,
        deadline_s: float = 60.0,
        python: str = sys.executable,
    ) -> None:
        self.device, self.size, self.deadline_s, self.python = device, size, deadline_s, python
        self.name = f"selftest[{device}]"

    async def _run(self, spec: HostSpec) -> tuple[Outcome, str]:
        argv = [self.python, "-c", SELFTEST, self.device, str(self.size)]
        try:
            code, out = await run_deadline(argv, self.deadline_s)
        except OSError as exc:
            return Outcome.FAIL, f"cannot start the engine runtime {self.python}: {exc}"
        last = out.splitlines()[-1] if out else ""
        if code is None:
            return Outcome.FAIL, f"runtime self-test did not finish in {self.deadline_s:g} s"
        if code != 0:
            return Outcome.FAIL, f"runtime self-test failed (exit {code}): {last}"
        return Outcome.PASS, last


#: Xids that take a GPU out of service (NVIDIA Health Validation rates 46 and 48 CRITICAL; 63/64
#: are page retirement pending/failed; 79 is "fallen off the bus"). reference/router-anchors.md.
CRITICAL_XIDS = frozenset({46, 48, 63, 64, 79})
XID_LINE = re.compile(r"NVRM: Xid \(([^)]*)\): (\d+)")


def critical_xids(kernel_log: str) -> list[tuple[str, int]]:
    """(device, xid) for every critical Xid line in a kernel log."""
    found = []
    for match in XID_LINE.finditer(kernel_log):
        xid = int(match.group(2))
        if xid in CRITICAL_XIDS:
            found.append((match.group(1), xid))
    return found


class XidCheck(_LocalCheck):
    """No critical Xid in the kernel log since boot (read with dmesg)."""

    name = "xid"
    needs = "Xid scan"

    async def _run(self, spec: HostSpec) -> tuple[Outcome, str]:
        if not (dmesg := shutil.which("dmesg")):
            return Outcome.UNAVAILABLE, "dmesg not found"
        code, out = await run_deadline([dmesg], 10.0)
        if code != 0:
            return Outcome.UNAVAILABLE, f"cannot read the kernel log (dmesg exit {code})"
        if found := critical_xids(out):
            where = ", ".join(f"Xid {x} on {d}" for d, x in found[:5])
            return Outcome.FAIL, f"critical Xid in the kernel log: {where}"
        return Outcome.PASS, "no critical Xid"


class NvmlCheck:
    """NVML: GPUs present, no uncorrectable ECC, no pending page retirement or row remap, cool."""

    name = "nvml"

    def __init__(self, max_temp_c: int = 85, expected_gpus: int | None = None) -> None:
        self.max_temp_c, self.expected_gpus = max_temp_c, expected_gpus

    async def __call__(self, spec: HostSpec) -> CheckResult:
        if not spec.local:
            return CheckResult(self.name, Outcome.UNAVAILABLE, "NVML needs the agent here")
        start = time.perf_counter()
        outcome, detail = await asyncio.to_thread(self.inspect)
        return CheckResult(self.name, outcome, detail, time.perf_counter() - start)

    def inspect(self) -> tuple[Outcome, str]:
        """Read every GPU's state through NVML (blocking; run in a thread)."""
        try:
            import pynvml
        except ImportError:
            return Outcome.UNAVAILABLE, "NVML not available: pip install 'fastboot[gpu]'"
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            return Outcome.UNAVAILABLE, f"NVML not available: {exc} (no NVIDIA driver here?)"
        try:
            return self._devices(pynvml)
        except pynvml.NVMLError as exc:
            return Outcome.FAIL, f"NVML query failed: {exc}"
        finally:
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlShutdown()

    def _devices(self, nv: Any) -> tuple[Outcome, str]:
        count = nv.nvmlDeviceGetCount()
        if count == 0 or (self.expected_gpus is not None and count != self.expected_gpus):
            return Outcome.FAIL, f"NVML sees {count} GPUs (expected {self.expected_gpus or '>0'})"
        problems = []
        for index in range(count):
            handle = nv.nvmlDeviceGetHandleByIndex(index)

            def query(fn: Callable[..., Any], *args: Any, _h: Any = handle) -> Any:
                try:
                    return fn(_h, *args)
                except nv.NVMLError_NotSupported:
                    return None

            ecc = query(
                nv.nvmlDeviceGetTotalEccErrors,
                nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                nv.NVML_VOLATILE_ECC,
            )
            if ecc:
                problems.append(f"GPU {index}: {ecc} uncorrectable ECC errors")
            if query(nv.nvmlDeviceGetRetiredPagesPendingStatus):
                problems.append(f"GPU {index}: page retirement pending (reset the GPU)")
            remap = query(nv.nvmlDeviceGetRemappedRows)
            if remap and (remap[2] or remap[3]):
                problems.append(f"GPU {index}: row remap pending or failed")
            temp = query(nv.nvmlDeviceGetTemperature, nv.NVML_TEMPERATURE_GPU)
            if temp is not None and temp > self.max_temp_c:
                problems.append(f"GPU {index}: {temp} C (> {self.max_temp_c} C)")
        if problems:
            return Outcome.FAIL, "; ".join(problems)
        return Outcome.PASS, f"{count} GPUs healthy per NVML"


class DcgmDiag(_LocalCheck):
    """`dcgmi diag -r LEVEL` (1: seconds to a minute; 2: ~2 min; 3: ~15 min; 4: ~1 h)."""

    needs = "dcgmi diag"

    def __init__(self, level: int = 1, deadline_s: float | None = None) -> None:
        self.level = level
        self.deadline_s = deadline_s or {1: 300.0, 2: 600.0, 3: 1800.0}.get(level, 7200.0)
        self.name = f"dcgm[r{level}]"

    async def _run(self, spec: HostSpec) -> tuple[Outcome, str]:
        if not (dcgmi := shutil.which("dcgmi")):
            return Outcome.UNAVAILABLE, "dcgmi not installed (NVIDIA DCGM); deep GPU diag skipped"
        code, out = await run_deadline([dcgmi, "diag", "-r", str(self.level)], self.deadline_s)
        if code is None:
            return Outcome.FAIL, f"dcgmi diag -r {self.level} did not finish in {self.deadline_s} s"
        failed = [line.strip() for line in out.splitlines() if re.search(r"\bFail\b", line)]
        if code != 0 or failed:
            return Outcome.FAIL, f"dcgmi diag -r {self.level} failed: {'; '.join(failed)[:300]}"
        return Outcome.PASS, f"dcgmi diag -r {self.level} passed"


class CheckSuite:
    """Runs checks in order; the first failure is the verdict."""

    def __init__(self, name: str, checks: Sequence[HealthCheck]) -> None:
        self.name, self.checks = name, list(checks)

    async def __call__(self, spec: HostSpec) -> CheckResult:
        start = time.perf_counter()
        passed: list[CheckResult] = []
        unavailable: list[CheckResult] = []
        for check in self.checks:
            result = await check(spec)
            if result.outcome is Outcome.FAIL:
                detail = f"{result.check}: {result.detail}"
                return CheckResult(self.name, Outcome.FAIL, detail, time.perf_counter() - start)
            (passed if result.outcome is Outcome.PASS else unavailable).append(result)
        outcome = Outcome.PASS if passed or not unavailable else Outcome.UNAVAILABLE
        detail = "; ".join(f"{r.check}: {r.detail}" for r in [*passed, *unavailable])
        return CheckResult(self.name, outcome, detail, time.perf_counter() - start)


class ByKind:
    """Dispatches to the CPU or GPU suite by `HostSpec.kind`."""

    def __init__(self, cpu: HealthCheck, gpu: HealthCheck) -> None:
        self.cpu, self.gpu = cpu, gpu

    async def __call__(self, spec: HostSpec) -> CheckResult:
        return await (self.gpu if spec.kind == "gpu" else self.cpu)(spec)


def short_check(python: str = sys.executable, deadline_s: float = 60.0) -> ByKind:
    """The boot/assignment tier (seconds)."""
    agent = AgentCheck()
    return ByKind(
        cpu=CheckSuite("short", [agent, RuntimeSelfTest("cpu", 256, deadline_s, python)]),
        gpu=CheckSuite(
            "short",
            [agent, NvmlCheck(), XidCheck(), RuntimeSelfTest("cuda", 1024, deadline_s, python)],
        ),
    )


def assign_check() -> ByKind:
    """The assignment tier (milliseconds): what can change while a checked host idles."""
    agent = AgentCheck()
    return ByKind(
        cpu=CheckSuite("assign", [agent]),
        gpu=CheckSuite("assign", [agent, NvmlCheck(), XidCheck()]),
    )


def deep_check(
    python: str = sys.executable, dcgm_level: int = 1, deadline_s: float = 120.0
) -> ByKind:
    """The idle-host tier (minutes): adds dcgmi diag on GPU hosts and a larger CPU matmul."""
    agent = AgentCheck()
    return ByKind(
        cpu=CheckSuite("deep", [agent, RuntimeSelfTest("cpu", 1024, deadline_s, python)]),
        gpu=CheckSuite("deep", [agent, NvmlCheck(), XidCheck(), DcgmDiag(dcgm_level)]),
    )
