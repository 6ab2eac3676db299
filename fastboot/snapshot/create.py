"""Taking a snapshot of a ready engine: warm up, record the oracle, quiesce, dump, publish.

`take()` is shared by `fastboot serve` (an engine in a pid namespace on the host's network) and
`fastboot snapshot create` (`create_isolated()`: an engine in its own network and mount
namespaces, which the agent restores many times at once; see fastboot.snapshot.isolation).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from fastboot import __version__, engines, envs
from fastboot.host import netns
from fastboot.engines import hooks, vllm
from fastboot.errors import FastbootError
from fastboot.host.proctree import held_signals, tree_pids
from fastboot.snapshot import criu as criu_mod
from fastboot.host import shm
from fastboot.snapshot import fingerprint, isolation
from fastboot.snapshot.digests import DigestCache
from fastboot.snapshot.store import Manifest, SnapshotId, Store
from fastboot.host.supervisor import EngineTree, become_subreaper, stdout_sink, stop_all

logger = logging.getLogger(__name__)

#: Digests of snapshot and model files by identity, beside the snapshots (see digests.py).
DIGEST_CACHE = ".digests.json"
#: Links of the throw-away namespaces isolated snapshots are taken in (one /30 per process).
SNAPSHOT_SUBNET = "10.212.0.0/16"


def engine_env(run_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env[envs.ENGINE_CHILD] = "1"
    env[envs.PLUGIN_REPORT] = str(run_dir / "plugin-report")
    return env


def check_plugin(run_dir: Path) -> None:
    """Engines swallow plugin errors: say whether fastboot's engine-side plugin really ran."""
    try:
        lines = (run_dir / "plugin-report").read_text().splitlines()
    except FileNotFoundError:
        lines = []
    if lines:
        logger.info("engine-side plugin loaded in %d engine processes", len(lines))
    else:
        logger.warning(
            "fastboot's vLLM plugin did not load in the engine (is it excluded by VLLM_PLUGINS, "
            "or fastboot installed in another environment?); quiesce/resume run from fastboot only"
        )


def attempt_dir(run_dir: Path, operation: str) -> Path:
    """A fresh directory for one CRIU run's log, stats and pidfile (criu refuses to overwrite
    a pidfile, and a run may restore twice: after a failed check it cold boots and re-snapshots)."""
    return Path(tempfile.mkdtemp(prefix=f"{operation}-", dir=run_dir))


@dataclass(frozen=True)
class Target:
    """Where a new snapshot goes and what it is a snapshot of."""

    store: Store
    snapshot_id: SnapshotId
    key: dict[str, Any]
    """The key parts the id is the digest of."""
    host: fingerprint.Fingerprint
    engine_argv: list[str]
    digests: DigestCache
    hooks: str | None = None
    """Module with quiesce/resume hooks."""
    isolation: dict[str, Any] | None = None
    """Set for an isolated engine (see Manifest.isolation)."""


def key_id(key: dict[str, Any]) -> SnapshotId:
    return SnapshotId(hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24])


def take(
    tree: EngineTree, url: str, model: str, cold_s: float, target: Target, run_dir: Path
) -> Manifest | None:
    """Snapshot the ready engine tree (the dump kills it) and publish the snapshot. None, with
    the reason logged, when it could not be taken: the engine then still runs (CRIU resumes a
    tree whose dump failed) and the caller may serve it."""
    quiesced = False
    try:
        criu = criu_mod.find_criu()
        engine = engines.get(str(target.key.get("engine", vllm.NAME)))
        engine.warm_up(url, model)
        oracle = engine.oracle(url, model)
        hooks.load(target.hooks).quiesce(url)
        quiesced = True
        with target.store.partial(target.snapshot_id) as partial:
            dump_s = _dump(criu, tree, partial, run_dir)
            manifest = target.store.publish(
                partial,
                Manifest(
                    id=target.snapshot_id,
                    key=target.key,
                    fingerprint=target.host,
                    oracle=oracle,
                    created=time.time(),
                    cold_boot_s=cold_s,
                    dump_s=dump_s,
                    engine_argv=target.engine_argv,
                    stdio_pipe=tree.stdio_pipe,
                    model_name=model,
                    isolation=target.isolation,
                ),
                target.digests,
            )
    except (FastbootError, OSError) as exc:
        logger.warning("no snapshot: %s", exc)
        if quiesced and tree.alive():
            hooks.load(target.hooks).resume(url)  # CRIU resumed the engine
        return None
    logger.info(
        "snapshot %s published: %.2f GB, dumped in %.1f s",
        target.snapshot_id[:12],
        manifest.total_bytes / 1e9,
        dump_s,
    )
    return manifest


def _dump(criu: criu_mod.Criu, tree: EngineTree, partial: Path, run_dir: Path) -> float:
    """Dump the tree into partial and save the /dev/shm files it needs; returns seconds.
    Processes holding CUDA contexts are locked and checkpointed first (fastboot.gpu.cycle)."""
    workdir = attempt_dir(run_dir, "dump")
    if tree.isolated:
        start = time.monotonic()
        with_gpu(tree, lambda: isolation.dump(criu, tree.root_pid, partial / "images", workdir))
        dump_s = time.monotonic() - start
        tree.after_dump()
        return dump_s
    with shm.criu_lock():
        shm_before = shm.listing()
        shm_names = shm.referenced(tree_pids(tree.root_pid))
        start = time.monotonic()
        with_gpu(tree, lambda: criu_mod.dump(criu, tree.root_pid, partial / "images", workdir))
        dump_s = time.monotonic() - start
        remaps = {n for n in shm.listing() - shm_before if n.startswith("link_remap.")}
        shm.save(shm_names | remaps, partial / "shm")
        shm.remove(sorted(remaps))
        # Saved: the dead tree's /dev/shm files can go (a restore writes them back).
        tree.after_dump()
    return dump_s


def with_gpu(tree: EngineTree, dump: Callable[[], None]) -> None:
    """dump(), with the tree's CUDA processes checkpointed around it (none on CPU engines)."""
    from fastboot.gpu.checkpoint import cuda_pids

    pids = cuda_pids(tree_pids(tree.root_pid))
    if not pids:
        dump()
        return
    from fastboot.gpu.checkpoint import CudaCheckpointer
    from fastboot.gpu.cycle import dump_with_gpu

    dump_with_gpu(pids, dump, CudaCheckpointer())


def gpu_after_restore(tree: EngineTree, manifest: Manifest) -> None:
    """Restore and unlock the CUDA state of a restored tree's processes (none on CPU engines),
    onto this host's GPUs where their UUIDs differ from the dump's (the driver's UUID remap).
    On failure the tree is stopped and the error (GpuRestoreError) raised: boot cold."""
    from fastboot.gpu.checkpoint import cuda_pids

    if not (pids := cuda_pids(tree_pids(tree.root_pid))):
        return
    from fastboot.gpu.checkpoint import CudaCheckpointer
    from fastboot.gpu.cycle import after_restore, uuid_pairs
    from fastboot.gpu.info import gpu_fields

    try:
        pairs = uuid_pairs(manifest.fingerprint.gpu_uuids, gpu_fields().get("gpu_uuids", ()))
        if pairs:
            logger.info("restoring onto other GPUs: %s", ", ".join(f"{a}->{b}" for a, b in pairs))
        after_restore(pids, CudaCheckpointer(), pairs)
    except FastbootError:
        tree.stop()
        raise


def restore_isolated(
    store: Store,
    manifest: Manifest,
    link: netns.Link,
    run_dir: Path,
    sink: BinaryIO | None = None,
) -> EngineTree:
    """Restore an isolated snapshot into link's namespace (no readiness check here); the
    engine's output goes to sink (default: fastboot's stdout)."""
    criu = criu_mod.find_criu()
    images, workdir = store.path(manifest.id) / "images", attempt_dir(run_dir, "restore")
    tree = restore_and_adopt(
        workdir,
        lambda fd: isolation.restore(criu, images, workdir, link.netns, manifest.stdio_pipe, fd),
        manifest.stdio_pipe,
        sink or stdout_sink(),
        isolated=True,
    )
    gpu_after_restore(tree, manifest)
    return tree


def restore_and_adopt(
    workdir: Path,
    restore: Callable[[int], int],
    stdio_pipe: str,
    sink: BinaryIO,
    isolated: bool = False,
) -> EngineTree:
    """Run restore(stdout write fd) -> restored pid, and take the tree over. However an
    exception or a Ctrl-C interrupts, the restored tree is either adopted (so stop_all() stops
    it) or killed: never left running with nobody holding it."""
    read_fd, write_fd = os.pipe()
    tree = None
    try:
        try:
            pid = restore(write_fd)
        finally:
            os.close(write_fd)
        with held_signals():  # from here the tree's output pump owns read_fd
            tree = EngineTree.adopt_restored(pid, read_fd, stdio_pipe, sink, isolated)
    except BaseException:
        if tree is None:
            criu_mod.kill_unadopted(workdir)
            os.close(read_fd)
        raise
    return tree


def check_oracle(url: str, model: str, manifest: Manifest) -> None:
    """The restored engine (of the engine the snapshot's key names) reproduces the oracle's
    greedy token ids."""
    want = manifest.oracle
    engine = engines.get(str(manifest.key.get("engine", vllm.NAME)))
    got = engine.generate_ids(url, model, want["prompt"], want["max_tokens"])
    if got != want["token_ids"]:
        raise vllm.EngineError(
            f"oracle mismatch: expected token ids {want['token_ids']}, got {got}"
        )


@dataclass(frozen=True)
class CreateConfig:
    """What `fastboot snapshot create` was asked to do."""

    model: str
    """MODEL as given (a local directory or a hub name)."""
    engine_argv: list[str]
    """Flags for `vllm serve`, verbatim (fastboot appends --host 0.0.0.0 --port PORT)."""
    store: Store
    port: int = 8000
    """The port the engine listens on inside its namespace (every replica: the same)."""
    hooks: str | None = None
    ready_timeout_s: float = 900.0


def isolated_target(config: CreateConfig, digests: DigestCache) -> Target:
    """Where the isolated snapshot of config goes: its key and id. The engine's --host/--port
    are fastboot's (0.0.0.0:port inside the namespace), so one snapshot serves every replica
    and `fastboot serve --fastboot-isolated` with the same flags finds the same snapshot."""
    from fastboot.serve import model_identity

    engine_version = vllm.version()
    argv = [*config.engine_argv, "--host", "0.0.0.0", "--port", str(config.port)]
    key = {
        "engine": vllm.NAME,
        "engine_version": engine_version,
        "argv": argv,
        "model": model_identity(config.model, digests),
        "fastboot": __version__,
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("VLLM_")},
        "layout": "isolated",
    }
    return Target(
        store=config.store,
        snapshot_id=key_id(key),
        key=key,
        host=fingerprint.current(f"{vllm.NAME} {engine_version}", gpu=True),
        engine_argv=argv,
        digests=digests,
        hooks=config.hooks,
        isolation={"port": config.port},
    )


def isolated_env(run_dir: Path) -> dict[str, str]:
    """The environment of an isolated engine."""
    env = engine_env(run_dir)
    # vLLM binds its ZMQ ipc:// sockets under this directory (default /tmp, shared by every
    # replica: "Can't bind ... Address already in use" on the second restore). The engine's
    # /dev/shm is its own tmpfs, saved and restored with it.
    env["VLLM_RPC_BASE_PATH"] = "/dev/shm"
    return env


def create_isolated(config: CreateConfig) -> Manifest:
    """Cold boot the engine in its own namespaces, snapshot it, and prove the snapshot restores
    (once, into a second namespace, oracle checked) before returning its manifest. A snapshot
    that does not restore is removed, never left for an agent to find. Engine output goes to
    stderr (the CLI prints the id on stdout)."""
    config.store.ensure()
    digests = DigestCache(config.store.root / DIGEST_CACHE)
    target = isolated_target(config, digests)
    argv = target.engine_argv
    hooks.load(config.hooks)
    become_subreaper()  # the probe restore's engine is reparented to us when criu exits
    # Two links per creating process: one for the engine, one for the probe restore.
    tag = os.getpid() % 8192
    link = netns.create(f"fb-snap-{os.getpid()}", f"fbs{tag}e", SNAPSHOT_SUBNET, 2 * tag)
    probe: netns.Link | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="fastboot-create-") as tmp:
            run_dir = Path(tmp)
            start = time.monotonic()
            env = isolated_env(run_dir)
            engine = vllm.command(config.model, argv)
            tree = EngineTree.spawn(engine, env, sys.stderr.buffer, link.netns)
            url = f"http://{link.ip}:{config.port}"
            try:
                model = vllm.wait_ready(url, config.ready_timeout_s, tree.alive)
            except vllm.EngineError as exc:
                raise vllm.EngineError(
                    f"cold boot failed: {exc}; last engine output:\n{tree.log_tail()}"
                ) from exc
            cold_s = time.monotonic() - start
            logger.info("cold boot ready in %.1f s", cold_s)
            check_plugin(run_dir)
            manifest = take(tree, url, model, cold_s, target, run_dir)
            tree.stop()
            if manifest is None:
                raise FastbootError("the engine could not be snapshotted (reason above)")
            # Never publish what does not restore: restore it once, elsewhere, and ask it.
            probe = netns.create(
                f"fb-snap-{os.getpid()}-probe", f"fbs{tag}p", SNAPSHOT_SUBNET, 2 * tag + 1
            )
            try:
                restored = restore_isolated(
                    config.store, manifest, probe, run_dir, sys.stderr.buffer
                )
                probe_url = f"http://{probe.ip}:{config.port}"
                vllm.wait_ready(probe_url, 120, restored.alive)
                check_oracle(probe_url, model, manifest)
            except (FastbootError, OSError) as exc:
                config.store.remove(manifest.id)
                raise FastbootError(
                    f"the new snapshot did not restore ({exc}); removed it"
                ) from exc
            logger.info("snapshot %s restores and reproduces its oracle", manifest.id[:12])
            return manifest
    finally:
        try:
            stop_all()
        finally:
            digests.save()
            netns.delete(link)
            if probe is not None:
                netns.delete(probe)
