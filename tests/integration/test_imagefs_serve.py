"""`fastboot serve --fastboot-weights-image` end to end: real FUSE, nginx, vLLM (CPU) and CRIU.

The tiny model is built as an image in an "origin" store, pushed to a directory that nginx
serves, and pulled lazily into the store `fastboot serve` uses, so the engine's weights arrive
over HTTP through the mount. One cold boot makes the module's snapshot; the other runs restore
it. Every run ends with SIGINT (Ctrl-C) and the test checks that the mount, its daemon and the
engine are gone, except where the mount was made outside `fastboot serve`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fastboot.imagefs import metrics as fbmetrics
from fastboot.imagefs.build import build
from fastboot.imagefs.mount import probe, umount
from fastboot.imagefs.store import ImageStore, pid_alive
from fastboot.imagefs.sync import pull
from fastboot.imagefs.testing import Nginx
from fastboot.models.tiny import cpu_serve_flags
from fastboot.snapshot.store import Manifest, Store
from tests.engine_process import (
    RESTORED,
    FastbootRun,
    free_port,
    processes_mentioning,
    serving,
)
from tests.fake_snapshots import fake_snapshot

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="CRIU and FUSE mounts need root"),
]

IMAGE = "tiny-weights"
SERVED = "tiny"


@dataclass
class Env:
    root: Path
    home: Path
    store: ImageStore
    index: str
    port: int
    server: Nginx

    @property
    def mountpoint(self) -> Path:
        """The stable per-image mountpoint (fastboot.imagefs.shared.stable_mountpoint)."""
        return self.home / "mounts" / self.index[:24]

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def vars(self) -> dict[str, str]:
        return {"FASTBOOT_HOME": str(self.home), "TMPDIR": str(self.root / "tmp")}

    def run(self, name: str, *extra: str, snapshots: Path | None = None) -> FastbootRun:
        argv = [
            SERVED,
            "--port",
            str(self.port),
            *cpu_serve_flags("tiny"),
            "--fastboot-weights-image",
            IMAGE,
            "--fastboot-snapshot-dir",
            str(snapshots or self.snapshots),
            *extra,
        ]
        return FastbootRun(argv, self.root / "logs" / f"{name}.log", env=self.vars)

    def stop_and_check_clean(self, run: FastbootRun, mount_stays: bool = False) -> None:
        """Ctrl-C; then no engine is left, and the mount is gone unless it must stay."""
        assert run.interrupt(signal.SIGINT) == 0, run.text()[-3000:]
        deadline = time.monotonic() + 30
        while (left := processes_mentioning(f"--port {self.port}")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"orphans: {left}\n{run.text()[-3000:]}"
        state = probe(str(self.mountpoint))
        if mount_stays:
            assert state == "mounted", state
            return
        # Unmounted, its daemon exited, its record and the (empty) mountpoint removed.
        assert state == "missing", (state, run.text()[-3000:])
        assert not self.store.mounts(include_dead=True), self.store.mounts(include_dead=True)
        assert not processes_mentioning(f'"mountpoint": "{self.mountpoint}"')
        assert not list((self.root / "tmp").glob("fastboot-*"))


def daemon_pid(env: Env) -> int:
    (record,) = [m for m in env.store.mounts() if m.mountpoint == str(env.mountpoint)]
    return record.pid


@pytest.fixture(scope="module")
def env(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("imagefs-serve")
    os.chmod(root, 0o755)  # nginx workers read the served directory
    for name in ("logs", "tmp", "served", "snapshots"):
        (root / name).mkdir()
    origin = ImageStore(root / "origin")
    ref = build(origin, tiny_model, IMAGE, progress=False)
    origin.push(IMAGE, root / "served")
    server = Nginx(root / "served", root / "nginx")
    server.start()
    home = root / "home"
    store = ImageStore(home / "images")
    try:
        pull(store, IMAGE, server.url)  # ref and index only: chunks come on use
        assert not list((store.root / "packs").glob("*.pack"))
        yield Env(root, home, store, ref.index, free_port(), server)
    finally:
        for record in store.mounts(include_dead=True):
            if probe(record.mountpoint) in ("mounted", "dead"):
                umount(Path(record.mountpoint), store, lazy=True)
        server.stop()
        for log in sorted((store.root / "mounts").glob("*.log")):
            print(f"--- {log} ---\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def first_run(env: Env) -> Iterator[FastbootRun]:
    with serving(env.run("first"), RESTORED, 600) as run:
        yield run


def client(env: Env):  # type: ignore[no-untyped-def]
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{env.port}/v1", api_key="unused", timeout=120)


def the_manifest(snapshots: Path) -> Manifest:
    (manifest,) = Store(snapshots).list()
    assert isinstance(manifest, Manifest), manifest
    return manifest


def assert_oracle(env: Env, manifest: Manifest) -> None:
    """The engine reproduces, through the official client, its pre-snapshot greedy output."""
    reply = client(env).completions.create(
        model=SERVED,
        prompt=str(manifest.oracle["prompt"]),
        max_tokens=int(manifest.oracle["max_tokens"]),
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    assert reply.choices[0].model_extra["token_ids"] == manifest.oracle["token_ids"]


def test_cold_boot_from_a_lazy_image_snapshots_and_the_restored_engine_answers(
    env: Env, first_run: FastbootRun
) -> None:
    lines = "\n".join(first_run.fastboot_lines())
    assert f"mounted image {IMAGE}" in lines and "cold boot ready in" in lines, lines
    assert "published" in lines, lines
    assert probe(str(env.mountpoint)) == "mounted"
    # vLLM got the mountpoint as MODEL and serves under the name given as MODEL.
    assert processes_mentioning(f"serve {env.mountpoint} --port {env.port}")
    models = client(env).models.list()
    assert [m.id for m in models.data] == [SERVED]
    # The snapshot is keyed by the image's index digest and the path the engine saw, not by
    # digests of the files (which would mean hashing the weights through FUSE at each boot).
    manifest = the_manifest(env.snapshots)
    assert manifest.key["model"] == {"path": str(env.mountpoint), "image_index": env.index}
    assert manifest.key["argv"][-2:] == ["--served-model-name", SERVED]
    # The weights really came over HTTP through the mount.
    values = fbmetrics.read_textfile(
        Path(next(m for m in env.store.mounts()).metrics_file)  # written every second
    )
    assert values.get('fastboot_imagefs_chunk_bytes_total{tier="remote"}', 0) > 1e6, values
    assert_oracle(env, manifest)


def test_ctrl_c_stops_the_engine_then_unmounts(env: Env, first_run: FastbootRun) -> None:
    pid = daemon_pid(env)
    env.stop_and_check_clean(first_run)
    assert not pid_alive(pid)
    assert "unmounted image" in "\n".join(first_run.fastboot_lines())


def test_next_run_mounts_again_and_restores(env: Env, first_run: FastbootRun) -> None:
    if first_run.proc.poll() is None:
        env.stop_and_check_clean(first_run)
    run = env.run("second")
    try:
        match = run.wait_for(RESTORED, 120)
        assert float(match[2]) < float(match[3])
        assert not [line for line in run.fastboot_lines() if "cold boot ready" in line]
        assert probe(str(env.mountpoint)) == "mounted"
        assert_oracle(env, the_manifest(env.snapshots))
        chat = client(env).chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert chat.choices[0].message.role == "assistant"
    finally:
        env.stop_and_check_clean(run)


def test_a_mount_made_outside_serve_is_shared_and_left_mounted(
    env: Env, first_run: FastbootRun
) -> None:
    if first_run.proc.poll() is None:
        env.stop_and_check_clean(first_run)
    env.mountpoint.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "fastboot", "image", "--store", str(env.store.root)]
    subprocess.run([*cli, "mount", IMAGE, str(env.mountpoint)], check=True, timeout=60)
    try:
        pid = daemon_pid(env)
        run = env.run("pinned")
        try:
            run.wait_for(RESTORED, 120)
            assert "sharing it (mounted outside fastboot serve" in run.text()
        finally:
            env.stop_and_check_clean(run, mount_stays=True)
        assert daemon_pid(env) == pid and "mounted outside fastboot" in run.text()
    finally:
        subprocess.run([*cli, "umount", str(env.mountpoint)], check=True, timeout=60)
    assert probe(str(env.mountpoint)) == "free"


def test_snapshot_stored_as_an_image_is_unpacked_on_another_host_and_restored(
    env: Env, first_run: FastbootRun
) -> None:
    """Host A builds and pushes its snapshot as an image; host B (another image store and
    snapshot directory) unpacks it from nginx, verified, and `fastboot serve` restores it."""
    if first_run.proc.poll() is None:
        env.stop_and_check_clean(first_run)
    manifest = the_manifest(env.snapshots)
    name = f"snap-{manifest.id}"

    def image(store: Path, *args: str) -> str:
        cli = [sys.executable, "-m", "fastboot", "image", "--store", str(store), *args]
        done = subprocess.run(cli, capture_output=True, text=True, timeout=300, env=env.vars)
        assert done.returncode == 0, done
        return done.stdout

    image(env.root / "origin", "build", str(env.snapshots / manifest.id), "--name", name)
    image(env.root / "origin", "push", name, "--to", str(env.root / "served"))
    host_b = env.root / "host-b"
    out = image(
        host_b / "images",
        "unpack-snapshot",
        name,
        "--remote",
        env.server.url,
        "--snapshot-dir",
        str(host_b / "snapshots"),
    )
    assert out.startswith(f"snapshot {manifest.id} in {host_b / 'snapshots'}"), out
    assert Store(host_b / "snapshots").verify(manifest.id).files == manifest.files
    # read whole once to copy them, the page images were not also kept for passthrough
    assert not list((host_b / "images" / "files").glob("*/*"))
    run = env.run("from-snapshot-image", snapshots=host_b / "snapshots")
    try:
        run.wait_for(RESTORED, 120)
        assert not [line for line in run.fastboot_lines() if "cold boot ready" in line]
        assert_oracle(env, manifest)
    finally:
        env.stop_and_check_clean(run)


@pytest.mark.parametrize("mode", ["copy", "mount", "lazy-pages"])
def test_a_pushed_snapshot_restores_on_a_host_that_lacks_it(
    env: Env, first_run: FastbootRun, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """`fastboot snapshot push` publishes the snapshot to nginx; a run whose snapshot directory
    is empty restores it from there with nothing pulled first: fetched into that directory
    (chunks verified as they arrive), or restored from the mounted image with its page images
    mapped (FASTBOOT_SNAPSHOT_FETCH=mount), or from the mounted image by `criu restore
    --lazy-pages` (FASTBOOT_LAZY_PAGES=1: each page served from the mount on first touch)."""
    if first_run.proc.poll() is None:
        env.stop_and_check_clean(first_run)
    manifest = the_manifest(env.snapshots)
    served = env.root / "served"
    if not (served / "snapshots" / f"{manifest.id}.json").exists():
        cli = [sys.executable, "-m", "fastboot", "snapshot", "--dir", str(env.snapshots), "push"]
        subprocess.run(
            [*cli, manifest.id, "--to", str(served), "--store", str(env.root / "origin")],
            check=True,
            timeout=300,
            env={**os.environ, **env.vars},
        )
    monkeypatch.setenv("FASTBOOT_SNAPSHOT_FETCH", "copy" if mode == "copy" else "mount")
    monkeypatch.setenv("FASTBOOT_LAZY_PAGES", "1" if mode == "lazy-pages" else "0")
    empty = env.root / f"lazy-snapshots-{mode}"
    run = env.run(f"lazy-{mode}", "--fastboot-snapshot-remote", env.server.url, snapshots=empty)
    try:
        run.wait_for(RESTORED, 120)
        lines = "\n".join(run.fastboot_lines())
        how = "fetched and checked" if mode == "copy" else "mounted and checked"
        assert f"lazily from {env.server.url}: {how}" in lines, lines
        assert "cold boot ready" not in lines, lines
        assert_oracle(env, manifest)
        if mode == "lazy-pages":  # the daemon fills in every page, then is gone
            run.wait_for("criu lazy-pages copied every page", 120)
        # The weights' mount, and in mount modes the snapshot's, whose page images are used.
        assert len(env.store.mounts()) == (1 if mode == "copy" else 2), env.store.mounts()
    finally:
        env.stop_and_check_clean(run)  # every mount released
    assert not processes_mentioning("criu lazy-pages")
    # Fetched: a local snapshot now, verified from scratch; mounted: nothing copied here.
    if mode == "copy":
        assert Store(empty).verify(manifest.id).files == manifest.files
    else:
        assert not (empty / manifest.id).exists()


def test_unknown_image_fails_before_anything_starts(env: Env, tmp_path: Path) -> None:
    argv = [SERVED, "--port", str(env.port), "--fastboot-weights-image", "no-such-image"]
    run = FastbootRun(argv, tmp_path / "unknown.log", env=env.vars)
    assert run.proc.wait(60) == 1
    assert "no image 'no-such-image'" in run.text()
    assert "cold boot" not in run.text()
    assert not processes_mentioning(f"--port {env.port}")


def test_unpack_snapshot_publishes_only_what_matches_its_manifest(tmp_path: Path) -> None:
    from fastboot.errors import ImageNotFoundError
    from fastboot.imagefs.snapshots import unpack_snapshot
    from fastboot.snapshot.store import SnapshotInvalid

    manifest = fake_snapshot(tmp_path / "a")
    source = tmp_path / "a" / manifest.id
    store = ImageStore(tmp_path / "images")
    build(store, source, "snap", progress=False)
    done = unpack_snapshot("snap", tmp_path / "b", store)
    assert done.bytes == manifest.total_bytes and done.manifest.files == manifest.files
    assert Store(tmp_path / "b").verify(manifest.id).files == manifest.files
    assert unpack_snapshot("snap", tmp_path / "b", store).bytes == 0  # already there
    # An image whose bytes differ from its manifest (a tampered snapshot directory) is refused
    # and nothing is published, not even a partial directory.
    pages = source / "images" / "pages-1.img"
    data = bytearray(pages.read_bytes())
    data[1 << 20] ^= 0xFF
    pages.write_bytes(bytes(data))
    build(store, source, "tampered", progress=False)
    with pytest.raises(SnapshotInvalid, match="does not match its manifest"):
        unpack_snapshot("tampered", tmp_path / "c", store)
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())
    (source / "images" / "extra.img").write_bytes(b"x")
    build(store, source, "extra", progress=False)
    with pytest.raises(SnapshotInvalid, match="does not list"):
        unpack_snapshot("extra", tmp_path / "c", store)
    build(store, source / "images", "not-a-snapshot", progress=False)
    with pytest.raises(SnapshotInvalid, match="is not a snapshot"):
        unpack_snapshot("not-a-snapshot", tmp_path / "c", store)
    with pytest.raises(ImageNotFoundError):
        unpack_snapshot("no-such-image", tmp_path / "c", store)
    assert not store.mounts(include_dead=True)  # every temporary mount is gone
