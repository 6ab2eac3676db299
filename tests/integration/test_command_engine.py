"""`--fastboot-engine command` on two servers nobody here wrote, end to end, real CRIU.

- llama.cpp: `python -m llama_cpp.server` (llama-cpp-python) on the tiny model as GGUF
  (`fastboot model tiny --format gguf`), whose greedy outputs are first checked against the
  safetensors model in transformers;
- Hugging Face's `transformers serve` on the tiny model's directory.

For each: a plain cold boot (`--fastboot-no-snapshot`) gives the reference answers; the first
`fastboot serve` cold boots, snapshots and serves the proving restore; a second run restores and
must answer the official openai client (models, completions, chat, streaming) exactly as the
cold boot did; a corrupted copy of the snapshot is never restored (cold boot, same answers);
every run ends with Ctrl-C and leaves no process or temp dir behind. The isolated layout
too, with llama.cpp: `fastboot snapshot create`, an agent's replica of it, and `fastboot serve
--fastboot-isolated` restoring the id `create` printed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.agents import agent_process, create_snapshot
from tests.engine_process import RESTORED, FastbootRun, free_port, processes_mentioning, serving

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="CRIU dumps and restores need root"),
]

PROMPTS = ["the quick brown fox", "a snapshot restores", "once upon a time there was"]
COLD = r"cold boot ready in ([\d.]+) s"


@dataclass(frozen=True)
class Server:
    """One third-party server under `fastboot serve --fastboot-engine command`."""

    name: str
    model: str
    """MODEL: what requests carry, and `{model}` in the command."""
    command: list[str]
    flags: list[str]
    """fastboot flags the server needs."""
    env: dict[str, str]

    def argv(self, port: int, *extra: str) -> list[str]:
        return [
            self.model,
            "--fastboot-engine",
            "command",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *self.flags,
            *extra,
            "--",
            *self.command,
        ]


@dataclass
class Workspace:
    server: Server
    port: int
    root: Path

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def run(self, name: str, *extra: str, snapshots: Path | None = None) -> FastbootRun:
        snapshot_dir = ["--fastboot-snapshot-dir", str(snapshots or self.snapshots)]
        argv = self.server.argv(self.port, *extra, *snapshot_dir)
        env = {"TMPDIR": str(self.tmp), **self.server.env}
        return FastbootRun(argv, self.root / f"{name}.log", env=env)

    def stop_and_check_clean(self, run: FastbootRun) -> None:
        """Ctrl-C: fastboot exits 0 and nothing of the run is left."""
        assert run.interrupt(signal.SIGINT) == 0, run.text()[-3000:]
        deadline = time.monotonic() + 30
        while (left := processes_mentioning(f"--port {self.port}")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"orphans: {left}\n{run.text()[-3000:]}"
        assert not processes_mentioning(str(self.tmp))
        assert not list(self.tmp.glob("fastboot-*")), list(self.tmp.iterdir())

    def client(self):  # type: ignore[no-untyped-def]
        import openai

        url = f"http://127.0.0.1:{self.port}/v1"
        return openai.OpenAI(base_url=url, api_key="unused", timeout=120, max_retries=0)


def answers(workspace: Workspace) -> dict[str, str]:
    """Greedy completions of PROMPTS and one greedy chat answer, through the openai client."""
    client = workspace.client()
    model = workspace.server.model
    out = {}
    for prompt in PROMPTS:
        reply = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
        out[prompt] = reply.choices[0].text
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0
    )
    out["chat"] = chat.choices[0].message.content or ""
    return out


@pytest.fixture(scope="module")
def gguf_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as GGUF, written by the CLI."""
    out = tmp_path_factory.mktemp("gguf") / "tiny"
    subprocess.run(
        [sys.executable, "-m", "fastboot", "model", "tiny", "--out", str(out), "--format", "gguf"],
        check=True,
        capture_output=True,
    )
    return out / "model.gguf"


def _llama_cpp(gguf: Path) -> Server:
    command = [sys.executable, "-m", "llama_cpp.server", "--model", "{model}"]
    command += ["--host", "{host}", "--port", "{port}", "--n_ctx", "512", "--n_threads", "1"]
    version = f"{sys.executable} -c 'import llama_cpp; print(llama_cpp.__version__)'"
    return Server("llama.cpp", str(gguf), command, ["--fastboot-engine-version-cmd", version], {})


def _transformers_serve(model: Path, hub_cache: Path) -> Server:
    transformers = str(Path(sys.executable).parent / "transformers")
    command = [transformers, "serve", "{model}", "--host", "{host}", "--port", "{port}"]
    command += ["--device", "cpu"]
    # /health answers once the pinned model is loaded; /v1/models lists the hub cache (an empty
    # one here: with none at all it answers 500).
    flags = ["--fastboot-ready-path", "/health", "--fastboot-key-env", "HF_"]
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)}
    return Server("transformers", str(model), command, flags, env)


@pytest.fixture(scope="module", params=["llama.cpp", "transformers"])
def workspace(
    request: pytest.FixtureRequest,
    tiny_model: Path,
    gguf_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Workspace:
    root = tmp_path_factory.mktemp(f"command-{request.param}")
    for name in ("snapshots", "tmp", "hub"):
        (root / name).mkdir()
    if request.param == "llama.cpp":
        server = _llama_cpp(gguf_model)
    else:
        server = _transformers_serve(tiny_model, root / "hub")
    return Workspace(server, free_port(), root)


@pytest.fixture(scope="module")
def reference(workspace: Workspace) -> dict[str, str]:
    """The answers of a plain cold boot (no snapshot read or written)."""
    with serving(workspace.run("plain", "--fastboot-no-snapshot"), COLD, 300) as run:
        got = answers(workspace)
        workspace.stop_and_check_clean(run)
    assert not workspace.snapshots.exists() or not list(workspace.snapshots.iterdir())
    return got


@pytest.fixture(scope="module")
def published(workspace: Workspace, reference: dict[str, str]) -> Path:
    """The first run: cold boot, snapshot, and the proving restore it serves."""
    with serving(workspace.run("first"), RESTORED, 300) as run:
        assert answers(workspace) == reference
        workspace.stop_and_check_clean(run)
    (snapshot,) = [p for p in workspace.snapshots.iterdir() if not p.name.startswith(".")]
    assert snapshot.stat().st_mode & 0o777 == 0o700
    return snapshot


def test_restore_serves_the_openai_api_as_the_cold_boot_did(
    workspace: Workspace, reference: dict[str, str], published: Path
) -> None:
    manifest = json.loads((published / "manifest.json").read_text())
    # What the oracle could compare: llama.cpp returns log-probabilities, transformers text.
    expected = {"llama.cpp": "logprobs", "transformers": "text"}[workspace.server.name]
    assert manifest["oracle"]["compare"] == expected
    assert manifest["key"]["engine"] == "command"
    assert manifest["key"]["model"]["content"]  # MODEL keyed by its content
    with serving(workspace.run("restored"), RESTORED, 120) as run:
        assert not [line for line in run.fastboot_lines() if re.search(COLD, line)], run.text()
        client = workspace.client()
        assert isinstance(client.models.list().data, list)
        assert answers(workspace) == reference
        stream = client.completions.create(
            model=workspace.server.model,
            prompt=PROMPTS[0],
            max_tokens=8,
            temperature=0,
            stream=True,
        )
        assert "".join(chunk.choices[0].text for chunk in stream) == reference[PROMPTS[0]]
        workspace.stop_and_check_clean(run)


def test_a_corrupted_snapshot_is_never_restored(
    workspace: Workspace, reference: dict[str, str], published: Path
) -> None:
    snapshots = workspace.root / "snapshots-corrupt"
    shutil.copytree(workspace.snapshots, snapshots, copy_function=os.link)
    pages = max((snapshots / published.name / "images").glob("pages-*.img"), key=os.path.getsize)
    data = bytearray(pages.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pages.unlink()  # a hard link: the module's snapshot keeps its bytes
    pages.write_bytes(bytes(data))
    with serving(workspace.run("corrupt", snapshots=snapshots), RESTORED, 300) as run:
        run.wait_for(r"not restoring snapshot \w+: .*does not match its digest.*cold boot", 5)
        run.wait_for(COLD, 5)
        assert answers(workspace) == reference
        workspace.stop_and_check_clean(run)


def test_gguf_computes_what_the_safetensors_model_does(tiny_model: Path, gguf_model: Path) -> None:
    """The GGUF's weights, layout and tokenizer are the safetensors model's: the same token
    ids, next-token logits within f32 rounding, and the same greedy continuation (llama.cpp's
    repeat penalty off, which the server applies by default)."""
    import llama_cpp
    import numpy as np
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    llm = llama_cpp.Llama(str(gguf_model), n_ctx=256, logits_all=True, verbose=False)
    try:
        for prompt in PROMPTS:
            ids = tokenizer(prompt)["input_ids"]
            assert llm.tokenize(prompt.encode(), add_bos=True) == ids
            with torch.no_grad():
                want = model(torch.tensor([ids])).logits[0, -1].numpy()
            llm.reset()
            llm.eval(ids)
            got = np.asarray(llm.scores[len(ids) - 1])
            assert np.abs(got - want).max() < 1e-3, np.abs(got - want).max()
            greedy = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)
            llm.reset()
            generated = []
            for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
                generated.append(token)
                if len(generated) == 6:
                    break
            assert generated == greedy[0, len(ids) :].tolist()
    finally:
        llm.close()


def test_snapshot_create_agent_replica_and_serve_isolated(gguf_model: Path, tmp_path: Path) -> None:
    """`fastboot snapshot create` of a llama.cpp command; an agent restores it as a replica;
    `fastboot serve --fastboot-isolated` with the same flags restores the same snapshot on the
    user's port. Both answer the oracle's prompt as the cold boot recorded it."""
    from fastboot.engines.base import ORACLE_MAX_TOKENS, ORACLE_PROMPT

    (tmp_path / "tmp").mkdir()
    workspace = Workspace(_llama_cpp(gguf_model), free_port(), tmp_path)
    server = workspace.server
    isolated = tmp_path / "isolated"
    flags = ["--fastboot-engine", "command", *server.flags, "--", *server.command]
    snapshot_id = create_snapshot(
        Path(server.model), isolated, tmp_path / "create.log", argv=[server.model, *flags]
    )
    manifest = json.loads((isolated / snapshot_id / "manifest.json").read_text())
    assert manifest["key"]["layout"] == "isolated"

    def oracle_text(base_url: str) -> str:
        import openai

        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=60)
        reply = client.completions.create(
            model=server.model, prompt=ORACLE_PROMPT, max_tokens=ORACLE_MAX_TOKENS, temperature=0
        )
        return reply.choices[0].text

    with agent_process(isolated, tmp_path / "state", tmp_path / "agent.log") as agent:
        (replica,) = agent.ok("POST", "/v1/replicas", {"snapshot": snapshot_id})["replicas"]
        ready = agent.wait_ready(replica["id"])
        assert oracle_text(str(ready["base_url"]).removesuffix("/v1")) == manifest["oracle"]["text"]
        assert agent.ok("DELETE", f"/v1/replicas/{replica['id']}")["state"] == "stopped"
    run = workspace.run("isolated", "--fastboot-isolated", snapshots=isolated)
    with serving(run, RESTORED, 120):
        assert snapshot_id.startswith(run.wait_for(RESTORED, 1).group(1))
        assert not [line for line in run.fastboot_lines() if re.search(COLD, line)]
        assert oracle_text(f"http://127.0.0.1:{workspace.port}") == manifest["oracle"]["text"]
        workspace.stop_and_check_clean(run)
