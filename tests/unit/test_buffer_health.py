"""Health checks: the agent check against a real HTTP server on 127.0.0.1, the real runtime
self-test (a fresh interpreter importing torch), and the GPU checks' "not available" answers."""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from fastboot.buffer.health import (
    AgentCheck,
    CheckResult,
    CheckSuite,
    DcgmDiag,
    NvmlCheck,
    Outcome,
    RuntimeSelfTest,
    XidCheck,
    critical_xids,
    run_deadline,
    short_check,
)
from fastboot.buffer.hosts import HostSpec

RESOURCES: dict[str, Any] = {
    "kind": "cpu",
    "slots": 2,
    "slots_free": 2,
    "memory_bytes": 2**34,
    "memory_available_bytes": 2**33,
    "gpus": [],
}


async def with_agent(
    health: dict[str, Any],
    resources: dict[str, Any],
    body: Callable[[str], Awaitable[None]],
) -> None:
    async def guard(request: web.Request, doc: dict[str, Any]) -> web.Response:
        if request.headers.get("Authorization") != "Bearer tok":
            return web.json_response({"error": {"message": "bad token"}}, status=401)
        return web.json_response(doc)

    async def get_health(request: web.Request) -> web.Response:
        return await guard(request, health)

    async def get_resources(request: web.Request) -> web.Response:
        return await guard(request, resources)

    app = web.Application()
    app.router.add_get("/v1/health", get_health)
    app.router.add_get("/v1/resources", get_resources)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        await body(f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("health", "resources", "token", "outcome", "says"),
    [
        ({"status": "ok"}, RESOURCES, "tok", Outcome.PASS, "2 free slots"),
        ({"status": "ok"}, RESOURCES, "wrong", Outcome.FAIL, "rejected the token (401)"),
        ({"status": "degraded"}, RESOURCES, "tok", Outcome.FAIL, "status 'degraded'"),
        ({"status": "ok"}, {**RESOURCES, "slots_free": 0}, "tok", Outcome.FAIL, "0 free slots"),
        ({"status": "ok"}, {**RESOURCES, "kind": "gpu"}, "tok", Outcome.FAIL, "a gpu host"),
    ],
)
def test_agent_check(
    health: dict[str, Any], resources: dict[str, Any], token: str, outcome: Outcome, says: str
) -> None:
    results: list[CheckResult] = []

    async def body(url: str) -> None:
        results.append(await AgentCheck(timeout_s=5)(HostSpec("h", url, token)))

    asyncio.run(with_agent(health, resources, body))
    assert results[0].outcome is outcome
    assert says in results[0].detail


def test_agent_check_unreachable_is_a_failure() -> None:
    spec = HostSpec("h", "http://127.0.0.1:9", "tok")  # discard port: nothing listens
    result = asyncio.run(AgentCheck(timeout_s=2)(spec))
    assert result.outcome is Outcome.FAIL and "unreachable" in result.detail


def test_runtime_self_test_really_runs_torch() -> None:
    check = RuntimeSelfTest("cpu", size=64, deadline_s=120)
    result = asyncio.run(check(HostSpec("here", "http://127.0.0.1:1", local=True)))
    assert result.outcome is Outcome.PASS, result.detail
    assert "torch" in result.detail and "cpu matmul 64x64" in result.detail
    remote = asyncio.run(check(HostSpec("there", "http://10.0.0.9:1")))
    assert remote.outcome is Outcome.UNAVAILABLE


def test_runtime_self_test_deadline_kills_and_fails(tmp_path: Path) -> None:
    hang = tmp_path / "python"
    hang.write_text("#!/bin/sh\nexec sleep 30\n")
    hang.chmod(0o755)
    check = RuntimeSelfTest("cpu", deadline_s=0.3, python=str(hang))
    result = asyncio.run(check(HostSpec("here", "http://127.0.0.1:1", local=True)))
    assert result.outcome is Outcome.FAIL and "did not finish in 0.3 s" in result.detail
    assert result.duration_s < 5


def test_runtime_self_test_reports_a_broken_runtime(tmp_path: Path) -> None:
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named torch'\nexit 1\n")
    broken.chmod(0o755)
    check = RuntimeSelfTest("cpu", python=str(broken))
    result = asyncio.run(check(HostSpec("here", "http://127.0.0.1:1", local=True)))
    assert result.outcome is Outcome.FAIL
    assert "exit 1" in result.detail and "No module named torch" in result.detail


def test_run_deadline_returns_output_and_code() -> None:
    code, out = asyncio.run(run_deadline([sys.executable, "-c", "print('hi'); exit(3)"], 30))
    assert (code, out) == (3, "hi")


def test_critical_xids_are_found_in_a_kernel_log() -> None:
    log = "\n".join(
        [
            "[ 12.1] NVRM: Xid (PCI:0000:3b:00): 13, pid=77, Graphics Exception",
            "[ 99.0] NVRM: Xid (PCI:0000:3b:00): 79, pid=0, GPU has fallen off the bus.",
            "[ 99.5] NVRM: Xid (PCI:0000:5e:00): 48, pid=0, DBE (double bit error)",
        ]
    )
    assert critical_xids(log) == [("PCI:0000:3b:00", 79), ("PCI:0000:5e:00", 48)]
    assert critical_xids("[1.0] usb 1-1: new device") == []


def test_gpu_checks_say_not_available_without_a_gpu_stack() -> None:
    local = HostSpec("here", "http://127.0.0.1:1", kind="gpu", local=True)
    nvml = asyncio.run(NvmlCheck()(local))
    if shutil.which("nvidia-smi") is None:  # this machine: no NVIDIA driver
        assert nvml.outcome is Outcome.UNAVAILABLE and "NVML not available" in nvml.detail
    else:  # a lent GPU machine: a real verdict
        assert nvml.outcome in (Outcome.PASS, Outcome.FAIL) and "GPU" in nvml.detail
    dcgm = asyncio.run(DcgmDiag(level=1)(local))
    if shutil.which("dcgmi") is None:
        assert dcgm.outcome is Outcome.UNAVAILABLE and "dcgmi not installed" in dcgm.detail
    remote = HostSpec("there", "http://10.0.0.9:1", kind="gpu")
    for check in (NvmlCheck(), XidCheck(), DcgmDiag(2)):
        assert asyncio.run(check(remote)).outcome is Outcome.UNAVAILABLE


def test_suite_stops_at_the_first_failure() -> None:
    calls: list[str] = []

    def fake(name: str, outcome: Outcome) -> Callable[[HostSpec], Awaitable[CheckResult]]:
        async def check(spec: HostSpec) -> CheckResult:
            calls.append(name)
            return CheckResult(name, outcome, f"{name} said {outcome.value}")

        return check

    spec = HostSpec("h", "http://x")
    suite = CheckSuite(
        "short",
        [fake("a", Outcome.PASS), fake("b", Outcome.FAIL), fake("c", Outcome.PASS)],
    )
    result = asyncio.run(suite(spec))
    assert result.outcome is Outcome.FAIL and result.detail == "b: b said fail"
    assert calls == ["a", "b"]
    only_unavailable = CheckSuite("deep", [fake("x", Outcome.UNAVAILABLE)])
    assert asyncio.run(only_unavailable(spec)).outcome is Outcome.UNAVAILABLE


def test_default_short_check_on_a_local_cpu_agent() -> None:
    results: list[CheckResult] = []

    async def body(url: str) -> None:
        spec = HostSpec("here", url, "tok", kind="cpu", local=True)
        results.append(await short_check()(spec))

    asyncio.run(with_agent({"status": "ok"}, RESOURCES, body))
    assert results[0].outcome is Outcome.PASS, results[0].detail
    assert "agent: agent ok" in results[0].detail and "selftest[cpu]: torch" in results[0].detail
