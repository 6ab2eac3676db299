"""SGLang in `fastboot serve`: engine choice, key, oracle, warm-up and memory-saver hooks against
a fake SGLang HTTP server on loopback; tensor-parallel NCCL settings."""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from fastboot import engines
from fastboot.boot.environment import tensor_parallel_env
from fastboot.cli.serve import engine_alias
from fastboot.engines import EngineError, hooks, sglang
from fastboot.errors import UsageError
from fastboot.serve import ServeConfig, serve, snapshot_key
from fastboot.snapshot.store import Manifest
from tests.unit.http_fakes import JsonHandler, running


class FakeSglang(ThreadingHTTPServer):
    output_ids: list[int]
    memory_saver = True
    requests: list[tuple[str, Any]]


class Handler(JsonHandler):
    server: FakeSglang

    def do_GET(self) -> None:
        self.server.requests.append((self.path, None))
        if self.path == "/health":
            self._answer(200, {})
        elif self.path == "/v1/models":
            self._answer(200, {"data": [{"id": "served"}]})
        else:
            self._answer(404, {})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])) or b"null")
        self.server.requests.append((self.path, body))
        if self.path == "/generate":
            self._answer(200, {"text": "t", "output_ids": self.server.output_ids})
        elif self.path in ("/v1/completions", "/v1/chat/completions"):
            self._answer(200, {"choices": [{"text": "t"}]})
        elif self.path.endswith("_memory_occupation") and self.server.memory_saver:
            self._answer(200, {"success": True})
        else:
            self._answer(400, {"error": "no memory saver"})


@pytest.fixture
def fake() -> Iterator[tuple[FakeSglang, str]]:
    server = FakeSglang(("127.0.0.1", 0), Handler)
    server.requests = []
    server.output_ids = [5, 6, 7]
    with running(server) as url:
        yield server, url


def test_ready_warm_up_and_oracle_through_sglangs_routes(fake: tuple[FakeSglang, str]) -> None:
    server, url = fake
    assert sglang.wait_ready(url, 5, lambda: True) == "served"
    server.requests.clear()
    sglang.warm_up(url, "served")
    paths = [p for p, _ in server.requests]
    assert paths == ["/v1/completions"] * 3 + ["/v1/chat/completions", "/generate"]
    # No vLLM-only field in what SGLang gets.
    assert all("return_token_ids" not in body for _, body in server.requests)
    oracle = sglang.oracle(url, "served")
    assert oracle["token_ids"] == [5, 6, 7] and oracle["prompt"] and oracle["max_tokens"] == 8
    assert server.requests[-1][1]["sampling_params"] == {"max_new_tokens": 8, "temperature": 0}
    server.output_ids = []
    with pytest.raises(EngineError, match="no output_ids"):
        sglang.oracle(url, "served")


def test_the_oracle_check_uses_the_engine_the_snapshot_names(
    fake: tuple[FakeSglang, str],
) -> None:
    server, url = fake
    oracle = {"prompt": "p", "max_tokens": 3, "token_ids": [5, 6, 7]}
    manifest = cast(Manifest, SimpleNamespace(key={"engine": "sglang"}, oracle=oracle))
    engine = engines.get(manifest.key["engine"])
    engine.check_oracle(url, "served", manifest.oracle)
    assert server.requests[-1][0] == "/generate"
    server.output_ids = [5, 6, 8]
    with pytest.raises(EngineError, match=r"expected token ids \[5, 6, 7\], got \[5, 6, 8\]"):
        engine.check_oracle(url, "served", manifest.oracle)


def test_memory_saver_hooks_release_then_resume(fake: tuple[FakeSglang, str]) -> None:
    server, url = fake
    loaded = hooks.load("fastboot.engines.sglang_memory_saver")
    loaded.quiesce(url)
    loaded.resume(url)
    assert server.requests == [
        ("/release_memory_occupation", {}),
        ("/resume_memory_occupation", {}),
    ]
    server.memory_saver = False
    with pytest.raises(EngineError, match="--enable-memory-saver"):
        loaded.quiesce(url)


def test_engine_choice_and_its_errors(tmp_path: Path) -> None:
    assert engines.get("sglang") is sglang
    with pytest.raises(UsageError, match="unknown engine 'tgi': choose one of vllm, sglang"):
        engines.get("tgi")
    with pytest.raises(UsageError, match="unknown engine"):
        serve(ServeConfig(model="m", engine_argv=[], engine="tgi"))
    with pytest.raises(UsageError, match="--fastboot-isolated runs vllm and command, not sglang"):
        serve(ServeConfig(model="m", engine_argv=[], engine="sglang", isolated=True))
    assert sglang.command("m", [], tmp_path / "python")[:3] == [
        str(tmp_path / "python"), "-m", "sglang.launch_server",
    ]  # fmt: skip
    dist = tmp_path / "sglang-0.5.9.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sglang\nVersion: 0.5.9\n")
    assert sglang.version([str(tmp_path)]) == "0.5.9"


def test_the_engine_flag_and_its_short_spelling() -> None:
    argv = ["m", "--engine", "sglang", "--port", "1", "--", "--engine", "x"]
    assert engine_alias(argv) == [
        "m", "--fastboot-engine", "sglang", "--port", "1", "--", "--engine", "x",
    ]  # fmt: skip
    assert engine_alias(["m", "--engine=sglang"]) == ["m", "--fastboot-engine=sglang"]
    assert engine_alias(["m", "--engine-count", "2"]) == ["m", "--engine-count", "2"]


def test_the_key_names_the_engine_and_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SGLANG_X", "1")
    monkeypatch.setenv("VLLM_Y", "2")
    id_s, key = snapshot_key(ServeConfig(model="org/m", engine_argv=[], engine="sglang"), "0.5")
    assert key["engine"] == "sglang" and key["env"] == {"SGLANG_X": "1"}
    id_v, key = snapshot_key(ServeConfig(model="org/m", engine_argv=[]), "0.5")
    assert key["engine"] == "vllm" and key["env"] == {"VLLM_Y": "2"} and id_s != id_v


def test_tensor_parallel_engines_get_the_nccl_settings_a_checkpoint_needs() -> None:
    full = {
        "NCCL_P2P_DISABLE": "1",
        "NCCL_NVLS_ENABLE": "0",
        "NCCL_SHM_DISABLE": "1",
        "NCCL_IB_DISABLE": "1",
    }
    assert tensor_parallel_env(["--tensor-parallel-size", "2"], {}) == full
    assert tensor_parallel_env(["-tp=4"], {}) == full
    assert tensor_parallel_env(["--tensor_parallel_size=8"], {}) == full
    # What the user set wins.
    chosen = tensor_parallel_env(["-tp", "2"], {"NCCL_P2P_DISABLE": "0"})
    assert "NCCL_P2P_DISABLE" not in chosen and len(chosen) == 3
    assert tensor_parallel_env(["--tensor-parallel-size", "1"], {}) == {}
    assert tensor_parallel_env(["--max-model-len", "2"], {}) == {}
