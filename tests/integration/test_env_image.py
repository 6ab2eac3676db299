"""`fastboot serve --fastboot-env-image`: the engine runs from an image of this virtual
environment (torch, vLLM, fastboot's plugin), mounted lazily through real FUSE; one cold boot
makes the snapshot, the next run restores it with the image mounted again.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fastboot.engines import vllm
from fastboot.imagefs.build import build
from fastboot.imagefs.mount import probe
from fastboot.imagefs.store import ImageStore
from fastboot.models.tiny import cpu_serve_flags
from fastboot.snapshot.store import Manifest, Store
from tests.engine_process import (
    RESTORED,
    FastbootRun,
    free_port,
    processes_mentioning,
    serving,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="CRIU and FUSE mounts need root"),
    pytest.mark.skipif(
        sys.prefix == sys.base_prefix, reason="the tests do not run in a virtual environment"
    ),
]

IMAGE = "env"


@dataclass
class Env:
    root: Path
    index: str
    model: Path
    port: int

    @property
    def mountpoint(self) -> Path:
        return self.root / "home" / "mounts" / self.index[:24]

    def run(self, name: str, image: str = IMAGE) -> FastbootRun:
        argv = [str(self.model), "--port", str(self.port), *cpu_serve_flags("tiny")]
        argv += ["--fastboot-env-image", image, "--fastboot-snapshot-dir", str(self.root / "s")]
        env = {"FASTBOOT_HOME": str(self.root / "home"), "TMPDIR": str(self.root / "tmp")}
        return FastbootRun(argv, self.root / f"{name}.log", env=env)

    def stop_and_check_clean(self, run: FastbootRun) -> None:
        """Ctrl-C; then no engine is left and the image is unmounted."""
        assert run.interrupt(signal.SIGINT) == 0, run.text()[-3000:]
        deadline = time.monotonic() + 30
        while (left := processes_mentioning(f"--port {self.port}")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"orphans: {left}\n{run.text()[-3000:]}"
        assert probe(str(self.mountpoint)) == "missing", run.text()[-3000:]
        assert not list((self.root / "tmp").glob("fastboot-*"))

    def oracle_answer(self) -> None:
        """Through the official client, the engine reproduces its pre-snapshot greedy output."""
        import openai

        (manifest,) = Store(self.root / "s").list()
        assert isinstance(manifest, Manifest)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", timeout=120
        )
        reply = client.completions.create(
            model=str(self.model),
            prompt=str(manifest.oracle["prompt"]),
            max_tokens=int(manifest.oracle["max_tokens"]),
            temperature=0,
            extra_body={"return_token_ids": True},
        )
        assert (reply.choices[0].model_extra or {})["token_ids"] == manifest.oracle["token_ids"]


@pytest.fixture(scope="module")
def env(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Env:
    root = tmp_path_factory.mktemp("env-image")
    (root / "tmp").mkdir()
    store = ImageStore(root / "home" / "images")
    ref = build(store, Path(sys.prefix), IMAGE, progress=False)
    build(store, tiny_model, "not-an-env", progress=False)
    return Env(root, ref.index, tiny_model, free_port())


@pytest.fixture(scope="module")
def first_run(env: Env) -> Iterator[FastbootRun]:
    with serving(env.run("first"), RESTORED, 900) as run:
        yield run


def engine_libraries(port: int) -> list[str]:
    """Paths of the shared libraries mapped by the engine's API server process."""
    (found,) = [p for p in processes_mentioning(f"--port {port}") if "vllm" in p]
    with open(f"/proc/{found.split()[0]}/maps") as maps:
        return [line.split()[-1] for line in maps if line.rstrip().endswith(".so")]


def test_engine_runs_from_the_image_and_snapshots(env: Env, first_run: FastbootRun) -> None:
    lines = "\n".join(first_run.fastboot_lines())
    assert f"mounted image {IMAGE}" in lines and "cold boot ready in" in lines, lines
    assert probe(str(env.mountpoint)) == "mounted"
    # The interpreter of the image runs vLLM, and torch's libraries are mapped from the mount.
    assert processes_mentioning(f"{env.mountpoint}/bin/python -m vllm.entrypoints.cli.main serve")
    torch_libs = [p for p in engine_libraries(env.port) if p.endswith("libtorch_cpu.so")]
    assert torch_libs and all(p.startswith(f"{env.mountpoint}/") for p in torch_libs), torch_libs
    # The snapshot is keyed by the image's content and the path the engine saw.
    (manifest,) = Store(env.root / "s").list()
    assert isinstance(manifest, Manifest)
    assert manifest.key["environment"] == {"path": str(env.mountpoint), "image_index": env.index}
    assert manifest.key["engine_version"] == vllm.version()
    env.oracle_answer()


def test_next_run_mounts_the_image_again_and_restores(env: Env, first_run: FastbootRun) -> None:
    env.stop_and_check_clean(first_run)
    run = env.run("second")
    try:
        match = run.wait_for(RESTORED, 180)
        assert float(match[2]) < float(match[3])
        assert not [line for line in run.fastboot_lines() if "cold boot ready" in line]
        assert probe(str(env.mountpoint)) == "mounted"
        assert any(p.startswith(f"{env.mountpoint}/") for p in engine_libraries(env.port))
        env.oracle_answer()
    finally:
        env.stop_and_check_clean(run)


def test_an_image_that_is_not_a_virtual_environment_is_refused(env: Env) -> None:
    run = env.run("not-an-env", image="not-an-env")
    assert run.proc.wait(60) == 1
    assert "is not a virtual environment" in run.text(), run.text()
    assert "cold boot" not in run.text()
    assert not processes_mentioning(f"--port {env.port}")
    assert not [p for p in (env.root / "home" / "mounts").iterdir() if probe(str(p)) == "mounted"]
