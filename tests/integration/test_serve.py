"""`fastboot serve` end to end with real vLLM (CPU), real CRIU and the official openai client.

One cold boot makes the module's snapshot; every other run restores it, or a copy of it with one
fault injected. Fault runs that must fall back to a cold boot are interrupted (Ctrl-C) as soon
as the cold boot has started, which also proves that Ctrl-C during a cold boot leaves nothing
behind; the oracle-mismatch run goes on to serve, proving the fallback serves.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fastboot.models.tiny import cpu_serve_flags
from fastboot.snapshot.store import Store
from tests.engine_process import (
    RESTORED,
    FastbootRun,
    free_port,
    process_states,
    processes_mentioning,
    serving,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="CRIU dumps and restores need root"),
]

#: KV cache sized to the need (32 MiB), so the image holds no cache worth rebuilding.
ENGINE_FLAGS = cpu_serve_flags("tiny")
COLD_BOOT_STARTED = "(APIServer pid=1)"


@dataclass
class Setup:
    model: Path
    port: int
    snapshots: Path
    tmp: Path
    logs: Path

    def argv(self, snapshots: Path | None = None) -> list[str]:
        return [
            str(self.model),
            "--port",
            str(self.port),
            *ENGINE_FLAGS,
            "--fastboot-snapshot-dir",
            str(snapshots or self.snapshots),
        ]

    def run(self, name: str, snapshots: Path | None = None, **env: str) -> FastbootRun:
        return FastbootRun(
            self.argv(snapshots), self.logs / f"{name}.log", env={"TMPDIR": str(self.tmp), **env}
        )

    def assert_clean(self, run: FastbootRun) -> None:
        """Nothing of the run is left: processes, temp dirs, partial snapshots."""
        deadline = time.monotonic() + 30
        while (left := processes_mentioning(f"--port {self.port}")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"orphans: {left}\n{run.text()[-3000:]}"
        # criu (and its helpers) run with their work dir in fastboot's temp dir.
        assert not (left := processes_mentioning(str(self.tmp))), f"orphans: {left}"
        # fastboot's own temp dirs; the engine's ZMQ socket files are vLLM's (plain vllm serve
        # leaves them too, and a restore re-binds them).
        assert not list(self.tmp.glob("fastboot-*")), list(self.tmp.iterdir())

    def copy_snapshots(self, name: str) -> tuple[Path, Path]:
        """A hard-linked copy of the snapshot directory and the snapshot in it."""
        dest = self.logs.parent / f"snapshots-{name}"
        shutil.copytree(self.snapshots, dest, copy_function=os.link)
        (snapshot,) = [p for p in dest.iterdir() if not p.name.startswith(".")]
        return dest, snapshot


def rewrite(path: Path, data: bytes) -> None:
    """Replace a (possibly hard-linked) file's content without touching its other links."""
    path.unlink()
    path.write_bytes(data)


def wait_cold_boot_started(run: FastbootRun, reason: str) -> None:
    run.wait_for(reason, 120)
    deadline = time.monotonic() + 120
    while COLD_BOOT_STARTED not in run.text():
        assert run.proc.poll() is None, run.text()[-3000:]
        assert time.monotonic() < deadline, run.text()[-3000:]
        time.sleep(0.2)


@pytest.fixture(scope="module", autouse=True)
def no_shm_left_behind() -> Iterator[None]:
    """Every /dev/shm file the module's engines made is gone when the module ends."""
    before = set(os.listdir("/dev/shm"))
    yield
    left = set(os.listdir("/dev/shm")) - before
    assert not left, f"left in /dev/shm: {sorted(left)}"


@pytest.fixture(scope="module")
def setup(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = tmp_path_factory.mktemp("serve")
    for name in ("snapshots", "tmp", "logs"):
        (root / name).mkdir()
    return Setup(tiny_model, free_port(), root / "snapshots", root / "tmp", root / "logs")


@pytest.fixture(scope="module")
def first_run(setup: Setup) -> Iterator[FastbootRun]:
    with serving(setup.run("first"), RESTORED, 900) as run:
        yield run


@pytest.fixture
def published(setup: Setup, first_run: FastbootRun) -> Path:
    """The module's snapshot directory, with the first run stopped (it holds the port)."""
    if first_run.proc.poll() is None:
        assert first_run.interrupt(signal.SIGINT) == 0
    return setup.snapshots


def client(setup: Setup):  # type: ignore[no-untyped-def]
    import openai

    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{setup.port}/v1", api_key="unused", timeout=120
    )


def oracle(setup: Setup) -> dict[str, object]:
    store = Store(setup.snapshots)
    (manifest,) = store.list()
    assert not isinstance(manifest, Exception), manifest
    return manifest.oracle


def greedy_token_ids(setup: Setup, prompt: str, max_tokens: int) -> list[int]:
    reply = client(setup).completions.create(
        model=str(setup.model),
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    token_ids = reply.choices[0].model_extra["token_ids"]  # type: ignore[index]
    assert token_ids, reply
    return list(token_ids)


def test_first_run_cold_boots_snapshots_and_serves_the_restored_engine(
    setup: Setup, first_run: FastbootRun
) -> None:
    lines = "\n".join(first_run.fastboot_lines())
    assert "yet: cold boot" in lines and "cold boot ready in" in lines
    # fastboot_patches really ran inside the engine (API server, EngineCore, worker).
    assert "engine-side plugin loaded in 3 engine processes" in lines
    assert "published" in lines
    want = oracle(setup)
    # The restored engine reproduces, through the official client, the pre-snapshot output.
    assert (
        greedy_token_ids(setup, str(want["prompt"]), int(str(want["max_tokens"])))
        == want["token_ids"]
    )


def test_snapshot_files_are_private(setup: Setup, first_run: FastbootRun) -> None:
    for path in [setup.snapshots, *setup.snapshots.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))


def test_snapshot_commands(setup: Setup, first_run: FastbootRun) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fastboot", "snapshot", "--dir", str(setup.snapshots), *args],
            capture_output=True,
            text=True,
        )

    ls = cli("ls")
    assert ls.returncode == 0 and len(ls.stdout.splitlines()) == 1, ls
    short_id = ls.stdout.split()[0]
    inspect = json.loads(cli("inspect", short_id).stdout)
    assert inspect["key"]["engine"] == "vllm" and inspect["key"]["argv"][:2] == [
        "--port",
        str(setup.port),
    ]
    assert inspect["fingerprint"]["kernel"] == os.uname().release
    assert inspect["oracle"]["token_ids"] and inspect["dump_s"] > 0 and inspect["total_bytes"] > 0
    verify = cli("verify", short_id)
    assert verify.returncode == 0 and verify.stdout.startswith("ok "), verify
    assert cli("inspect", "no-such-id").returncode == 1


def test_ctrl_c_while_serving_stops_everything(setup: Setup, first_run: FastbootRun) -> None:
    assert first_run.interrupt(signal.SIGINT) == 0
    setup.assert_clean(first_run)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("link_remap.")]


def test_second_run_restores_and_serves(setup: Setup, published: Path) -> None:
    run = setup.run("second")
    try:
        match = run.wait_for(RESTORED, 120)
        restore_s, cold_s = float(match[2]), float(match[3])
        assert restore_s < cold_s
        assert not [line for line in run.fastboot_lines() if "cold boot ready" in line]
        want = oracle(setup)
        assert greedy_token_ids(setup, str(want["prompt"]), 8) == want["token_ids"]
        chat = client(setup).chat.completions.create(
            model=str(setup.model), messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert chat.choices[0].message.role == "assistant"
        # A fresh request, never seen before the dump, is served and deterministic.
        fresh = greedy_token_ids(setup, "a prompt the snapshot never saw", 6)
        assert fresh == greedy_token_ids(setup, "a prompt the snapshot never saw", 6)
    finally:
        assert run.interrupt(signal.SIGTERM) == 0
    setup.assert_clean(run)
    # The engine's multiprocessing semaphore was put back under its name, as a hard link of the
    # file CRIU maps (shm.py), so the restored engine's exit unlinks it without a traceback.
    (manifest,) = Store(published).list()
    assert not isinstance(manifest, Exception), manifest
    saved = {p.name: p.stat().st_ino for p in (published / manifest.id / "shm").iterdir()}
    (semaphore,) = [name for name in saved if name.startswith("sem.mp-")]
    assert any(n.startswith("link_remap.") and i == saved[semaphore] for n, i in saved.items())
    assert "sem_unlink" not in run.text(), run.text()[-3000:]
    assert semaphore not in os.listdir("/dev/shm")


def _corrupt(snapshot: Path) -> str:
    path = min(
        (p for p in (snapshot / "images").iterdir()), key=lambda p: p.stat().st_size or 1 << 60
    )
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rewrite(path, bytes(data))
    return "does not match its digest"


def _truncate(snapshot: Path) -> str:
    path = max((snapshot / "images").glob("pages-*.img"), key=lambda p: p.stat().st_size)
    with path.open("rb") as f:
        head = f.read(4096)
    rewrite(path, head)
    return "bytes, manifest says"


def _foreign_host(snapshot: Path) -> str:
    manifest = json.loads((snapshot / "manifest.json").read_text())
    manifest["fingerprint"]["kernel"] = "99.0.0-future"  # a newer kernel's snapshot
    rewrite(snapshot / "manifest.json", json.dumps(manifest).encode())
    return "does not fit this host \\(kernel differs"


@pytest.mark.parametrize("fault", [_corrupt, _truncate, _foreign_host])
def test_bad_snapshot_is_never_restored_and_ctrl_c_during_cold_boot_is_clean(
    setup: Setup, published: Path, fault: object
) -> None:
    snapshots, snapshot = setup.copy_snapshots(fault.__name__)  # type: ignore[attr-defined]
    reason = fault(snapshot)  # type: ignore[operator]
    run = setup.run(f"fault{fault.__name__}", snapshots)  # type: ignore[attr-defined]
    try:
        wait_cold_boot_started(run, reason)
        assert not [line for line in run.fastboot_lines() if "restored snapshot" in line]
    finally:
        assert run.interrupt(signal.SIGINT) == 0
    setup.assert_clean(run)
    assert not [p for p in snapshots.iterdir() if p.name.startswith(".partial-")]


def _fake_criu(tmp: Path, name: str, body: str) -> str:
    path = tmp / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


FAIL = 'echo "Error (fake): no" >&2; exit 1'


@pytest.mark.parametrize("case", ["missing", "too-old", "restore-fails"])
def test_criu_problems_fall_back_to_a_cold_boot(
    setup: Setup, published: Path, tmp_path: Path, case: str
) -> None:
    from fastboot.snapshot.criu import find_criu

    real = find_criu().path
    criu, reason = {
        "missing": (
            str(tmp_path / "no-criu"),
            "does not run.*fastboot install-criu.*fastboot doctor",
        ),
        "too-old": (
            _fake_criu(tmp_path, "old-criu", "echo 'Version: 3.17.1'"),
            r"3\.17\.1, too old",
        ),
        "restore-fails": (
            _fake_criu(
                tmp_path, "failing-criu", f'[ "$1" = restore ] && {{ {FAIL}; }}\nexec {real} "$@"'
            ),
            r"criu restore failed: Error \(fake\): no",
        ),
    }[case]
    snapshots, _ = setup.copy_snapshots(f"criu-{case}")
    run = setup.run(f"criu-{case}", snapshots, FASTBOOT_CRIU=criu)
    try:
        wait_cold_boot_started(run, reason)
    finally:
        assert run.interrupt(signal.SIGINT) == 0
    setup.assert_clean(run)
    assert len(snapshot_ids(snapshots)) == 1  # the good snapshot is still there


def test_busy_port_is_reported_before_anything_starts(setup: Setup) -> None:
    with socket.socket() as busy:
        # The earlier tests' connections may leave the port in TIME_WAIT; a listener is
        # still refused with SO_REUSEADDR, which is what fastboot's own check sets too.
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", setup.port))
        busy.listen()
        run = setup.run("busy-port")
        assert run.proc.wait(60) == 1
    assert f"port {setup.port} on 127.0.0.1 is busy" in run.text()
    setup.assert_clean(run)


def test_engine_dying_during_cold_boot_is_a_clear_error(setup: Setup, tmp_path: Path) -> None:
    argv = [
        str(setup.model),
        "--port",
        str(setup.port),
        "--max-model-len",
        "not-a-number",
        "--fastboot-snapshot-dir",
        str(tmp_path / "snaps"),
    ]
    run = FastbootRun(argv, setup.logs / "engine-dies.log", env={"TMPDIR": str(setup.tmp)})
    assert run.proc.wait(300) == 1
    error = next(line for line in run.fastboot_lines() if "ERROR" in line)
    assert "cold boot failed: the engine exited before it was ready" in error
    # The tail of the engine's own output comes with the error.
    assert "invalid human_readable_int_or_auto value: 'not-a-number'" in run.text().split(error)[1]
    setup.assert_clean(run)
    assert not (tmp_path / "snaps").exists()  # nothing was written, not even a directory


def test_oracle_mismatch_falls_back_to_a_cold_boot_that_serves(
    setup: Setup, published: Path
) -> None:
    snapshots, snapshot = setup.copy_snapshots("oracle")
    manifest = json.loads((snapshot / "manifest.json").read_text())
    manifest["oracle"]["token_ids"] = [t + 1 for t in manifest["oracle"]["token_ids"]]
    rewrite(snapshot / "manifest.json", json.dumps(manifest).encode())
    run = setup.run("oracle-mismatch", snapshots)
    try:
        run.wait_for("failed its check \\(oracle mismatch", 120)
        run.wait_for("cold boot ready in", 600)
        # It serves, and a fresh snapshot replaced the bad one.
        run.wait_for(RESTORED, 300)
        want = oracle(setup)
        assert greedy_token_ids(setup, str(want["prompt"]), 8) == want["token_ids"]
    finally:
        assert run.interrupt(signal.SIGTERM) == 0
    setup.assert_clean(run)
    fixed = json.loads((snapshot / "manifest.json").read_text())
    assert fixed["oracle"]["token_ids"] == oracle(setup)["token_ids"]


def snapshot_ids(snapshots: Path) -> list[str]:
    """Published snapshot ids (not partials, not the digest cache)."""
    return [p.name for p in snapshots.iterdir() if p.is_dir() and not p.name.startswith(".")]


def test_ctrl_c_between_cold_boot_and_dump_is_clean(setup: Setup, tmp_path: Path) -> None:
    snapshots = tmp_path / "snaps"
    run = setup.run("ctrl-c-warm-up", snapshots)
    run.wait_for("cold boot ready in", 600)  # now warming up, recording the oracle, dumping
    assert run.interrupt(signal.SIGINT) == 0
    setup.assert_clean(run)
    assert not snapshots.exists() or not [p for p in snapshots.iterdir() if p.is_dir()]


def test_killed_mid_dump_publishes_nothing_and_the_next_run_works(
    setup: Setup, tmp_path: Path
) -> None:
    snapshots = tmp_path / "snaps"
    shm_before = set(os.listdir("/dev/shm"))
    run = setup.run("killed-mid-dump", snapshots)
    run.wait_for("cold boot ready in", 600)
    this_dump = f"dump --images-dir {snapshots}/"  # not a stray criu of an earlier test
    deadline = time.monotonic() + 120
    while not processes_mentioning(this_dump):
        assert time.monotonic() < deadline and run.proc.poll() is None, run.text()[-3000:]
        time.sleep(0.05)
    os.kill(run.proc.pid, signal.SIGKILL)  # fastboot alone, mid-dump
    run.proc.wait()
    deadline = time.monotonic() + 120
    while processes_mentioning(this_dump) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not snapshot_ids(snapshots)
    # criu finished the dump on its own and killed the engine: nothing of that run survives.
    # The pid namespace's teardown waits for every task in it to exit; on a loaded 2-core CI
    # host the engine's unshare outlived a 30 s wait once, hence the long deadline and the
    # states of whatever is left in the failure message.
    deadline = time.monotonic() + 180
    while (left := processes_mentioning(f"--port {setup.port}")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, process_states([int(line.split()[0]) for line in left])
    # What only the SIGKILLed fastboot could have removed: its temp dir and the /dev/shm files
    # of the engine the dump killed.
    for path in setup.tmp.glob("fastboot-*"):
        shutil.rmtree(path)
    for name in set(os.listdir("/dev/shm")) - shm_before:
        os.unlink(f"/dev/shm/{name}")
    hooks_log = tmp_path / "hooks.log"
    again = FastbootRun(
        [*setup.argv(snapshots), "--fastboot-hooks", "tests.hooks_probe"],
        setup.logs / "after-kill.log",
        env={"TMPDIR": str(setup.tmp), "FASTBOOT_TEST_HOOKS_LOG": str(hooks_log)},
    )
    try:
        again.wait_for(RESTORED, 900)
    finally:
        assert again.interrupt(signal.SIGINT) == 0
    setup.assert_clean(again)
    # The quiesce hook ran on the live engine before the dump, resume on the restored one.
    url = f"http://127.0.0.1:{setup.port}"
    assert hooks_log.read_text().splitlines() == [f"quiesce {url} 200", f"resume {url} 200"]
    assert len(snapshot_ids(snapshots)) == 1
    assert not [p for p in snapshots.iterdir() if p.name.startswith(".partial-")]
