"""`fastboot serve MODEL --engine sglang`: the SGLang adapter through a real `fastboot serve`
cycle (cold boot, warm-up, oracle, CRIU dump, publish, restore, oracle check) with real CRIU.

SGLang itself does not install on the CPU machines, so the engine is the stand-in server in
tests/standins (`python -m sglang.launch_server`, the routes fastboot and clients use); what is
under test is fastboot's side: flag translation, readiness, the `/generate` oracle, the key, no
engine-side plugin, and that the second run serves the same process state restored.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from fastboot.engines import vllm
from fastboot.snapshot.store import Manifest, Store
from tests.engine_process import RESTORED, FastbootRun, free_port, processes_mentioning

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="CRIU dumps and restores need root"),
]

STANDINS = Path(__file__).resolve().parent.parent / "standins"
MODEL = "org/standin-model"


def get(port: int, path: str) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        answer: dict[str, object] = json.loads(response.read())
        return answer


def generate(port: int, prompt: str, n: int) -> object:
    body = {"text": prompt, "sampling_params": {"max_new_tokens": n, "temperature": 0}}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/generate",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["output_ids"]


def stop_and_check_clean(run: FastbootRun, port: int, tmp: Path) -> None:
    assert run.interrupt(signal.SIGINT) == 0, run.text()[-3000:]
    deadline = time.monotonic() + 30
    while (left := processes_mentioning(f"--port {port}")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"orphans: {left}\n{run.text()[-3000:]}"
    assert not list(tmp.glob("fastboot-*"))


def test_sglang_cold_boots_snapshots_and_the_next_run_restores(tmp_path: Path) -> None:
    port, snapshots, tmp = free_port(), tmp_path / "snapshots", tmp_path / "tmp"
    tmp.mkdir()
    argv = [MODEL, "--engine", "sglang", "--port", str(port), "--max-model-len", "512"]
    argv += ["--fastboot-snapshot-dir", str(snapshots)]
    env = {"PYTHONPATH": str(STANDINS), "TMPDIR": str(tmp)}

    first = FastbootRun(argv, tmp_path / "first.log", env=env)
    try:
        first.wait_for(RESTORED, 180)
        cold = get(port, "/boot")
        # vLLM's flags reached the engine translated, with vLLM's defaults where SGLang differs.
        assert cold["argv"] == [
            "--model-path", MODEL, "--port", str(port), "--context-length", "512",
            "--host", "0.0.0.0",
        ]  # fmt: skip
        (manifest,) = Store(snapshots).list()
        assert isinstance(manifest, Manifest)
        assert manifest.key["engine"] == "sglang"
        assert manifest.key["engine_version"] == "0.0.0+standin"
        # The oracle is /generate's greedy token ids, and the restored engine reproduces them.
        want = manifest.oracle["token_ids"]
        assert generate(port, vllm.ORACLE_PROMPT, vllm.ORACLE_MAX_TOKENS) == want
        assert "engine-side plugin" not in first.text()  # SGLang has none; no false warning
    finally:
        stop_and_check_clean(first, port, tmp)

    second = FastbootRun(argv, tmp_path / "second.log", env=env)
    try:
        match = second.wait_for(RESTORED, 60)
        assert float(match[2]) < float(match[3])
        assert not [line for line in second.fastboot_lines() if "cold boot ready" in line]
        # The same process state as the snapshot's: its boot token survived, it was not relaunched.
        assert get(port, "/boot")["boot"] == cold["boot"]
        assert generate(port, "a prompt the snapshot never saw", 4) == generate(
            port, "a prompt the snapshot never saw", 4
        )
    finally:
        stop_and_check_clean(second, port, tmp)
