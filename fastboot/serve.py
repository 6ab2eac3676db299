"""`fastboot serve`: a drop-in for `vllm serve` that restores a warmed engine from a snapshot.

    serve(config)
      ├─ snapshot for this key, verified, compatible?  -> restore, oracle, serve
      │     (any failure: log why, stop what was restored, fall through to a cold boot)
      └─ cold boot -> ready -> warm up -> oracle -> dump -> publish -> restore -> oracle -> serve
            (dump failure: CRIU resumed the engine; serve it and log why there is no snapshot)

Fail open to a cold boot, never to a wrong answer: a restored engine serves only after it
reproduced the oracle's token ids.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

from fastboot import __version__, engines, envs
from fastboot.engines import hooks, vllm
from fastboot.errors import CriuMissingError, FastbootError, UsageError
from fastboot.snapshot import criu as criu_mod
from fastboot.host import shm
from fastboot.snapshot import fingerprint
from fastboot.snapshot.create import (
    DIGEST_CACHE,
    Target,
    attempt_dir,
    check_oracle,
    check_plugin,
    engine_env,
    gpu_after_restore,
    key_id,
    restore_and_adopt,
    take,
)
from fastboot.snapshot.digests import DigestCache, file_digest
from fastboot.snapshot.store import Manifest, SnapshotId, Store
from fastboot.host.supervisor import EngineTree, become_subreaper, stdout_sink, stop_all

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """What `fastboot serve` was asked to do."""

    model: str
    """MODEL as given (a local directory or a hub name)."""
    engine_argv: list[str]
    """Flags for the engine, verbatim (vLLM's; translated for SGLang)."""
    engine: str = vllm.NAME
    """Which engine runs: "vllm" or "sglang" (fastboot.engines)."""
    host: str | None = None
    """--host as given to the engine (read only)."""
    port: int | None = None
    """--port as given to the engine (read only)."""
    snapshot_dir: Path | None = None
    """Where snapshots live (default $FASTBOOT_HOME/snapshots)."""
    snapshot: bool = True
    """False: plain cold boot, no snapshot read or written."""
    refresh: bool = False
    """True: ignore an existing snapshot and make a new one."""
    hooks: str | None = None
    """Module with quiesce/resume hooks (see fastboot.engines.hooks)."""
    ready_timeout_s: float = 900.0
    """How long a cold boot may take to answer."""
    restore_timeout_s: float = 120.0
    """How long a restored engine may take to answer."""
    weights_image: str | None = None
    """Image to take the model from: mounted read-only at a stable path that vLLM gets as its
    MODEL; MODEL stays the name clients use (see fastboot.imagefs.shared)."""
    isolated: bool = False
    """Serve as one replica: the engine in its own network, mount and pid namespaces with the
    snapshot agents restore, published on host/port by a relay (fastboot.serve_isolated)."""
    rpc_dir: Path | None = None
    """Where the engine binds its ZMQ ipc:// sockets (VLLM_RPC_BASE_PATH; vLLM's default is
    /tmp, where every run left files behind). Set by serve(); see rpc_dir()."""
    model_identity: dict[str, Any] | None = None
    """How the snapshot key names the model when it is not hashed from its files (an image:
    its index digest and mountpoint). Set by serve() for weights_image."""
    env_image: str | None = None
    """Image of a Python virtual environment with vLLM to run the engine from: mounted
    read-only at a stable path, the engine run by its interpreter (see _env_from_image)."""
    engine_python: Path | None = None
    """The interpreter that runs the engine (None: the `vllm` beside fastboot). Set by serve()
    for env_image."""
    environment: dict[str, Any] | None = None
    """The env image in the snapshot key (index digest and mountpoint). Set by serve()."""

    @property
    def store(self) -> Store:
        return Store(self.snapshot_dir or envs.snapshot_dir())

    @property
    def url(self) -> str:
        return vllm.base_url(self.host, self.port)


class _Stop(Exception):
    """SIGINT/SIGTERM arrived: stop the engine and exit."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def _already_stopping(signum: int, frame: FrameType | None) -> None:
    logger.info("%s: already stopping the engine", signal.Signals(signum).name)


@contextlib.contextmanager
def _captured_signals(handler: Any = _raise_stop) -> Iterator[None]:
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def model_identity(model: str, cache: DigestCache | None = None) -> dict[str, Any]:
    """A local model by the digest of its files (remembered in cache while they are
    unchanged); a hub name as given."""
    path = Path(model)
    if not path.is_dir():
        return {"name": model}
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path)}\0{file.stat().st_size}\0".encode())
        digest.update((cache.digest(file) if cache else file_digest(file)).encode())
    return {"path": str(path.resolve()), "content": digest.hexdigest()}


def snapshot_key(
    config: ServeConfig, engine_version: str, cache: DigestCache | None = None
) -> tuple[SnapshotId, dict[str, Any]]:
    """The key parts and their digest, the snapshot's id. The host fingerprint is checked
    separately, so a snapshot that does not fit this host is reported, not silently missed."""
    prefixes = engines.get(config.engine).ENV_PREFIXES
    key = {
        "engine": config.engine,
        "engine_version": engine_version,
        "argv": config.engine_argv,
        "model": config.model_identity or model_identity(config.model, cache),
        "fastboot": __version__,
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(prefixes)},
    }
    if config.environment is not None:  # only then: keys of snapshots without one stay as they were
        key["environment"] = config.environment
    return key_id(key), key


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on host right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def check_port_free(host: str | None, port: int | None) -> None:
    address = host if host not in (None, "") else "0.0.0.0"
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port or 8000))
        except OSError as exc:
            raise UsageError(
                f"port {port or 8000} on {address} is busy ({exc.strerror}); "
                "stop what listens there or pass another --port"
            ) from exc


def serve(config: ServeConfig) -> int:
    """Run the engine until it exits or SIGINT/SIGTERM arrives; returns the exit code."""
    engine = engines.get(config.engine)  # an unknown engine fails before anything starts
    if config.isolated:
        if config.engine != vllm.NAME:
            raise UsageError(f"--fastboot-isolated runs vLLM only, not {config.engine} (yet)")
        for flag, value in (("weights", config.weights_image), ("env", config.env_image)):
            if value:
                raise UsageError(f"--fastboot-isolated does not take --fastboot-{flag}-image yet")
        from fastboot.serve_isolated import serve_isolated

        return serve_isolated(config)
    check_port_free(config.host, config.port)
    config = replace(config, rpc_dir=rpc_dir(config))
    hooks.load(config.hooks)  # a bad --fastboot-hooks fails now, not after a cold boot
    become_subreaper()
    mounts: list[Any] = []  # SharedMounts acquired, released after the engines stopped
    with _captured_signals(), tempfile.TemporaryDirectory(prefix="fastboot-run-") as run_dir:
        try:
            if config.env_image or config.weights_image:
                from fastboot.imagefs.shared import SharedMount
            if config.env_image:
                mounts.append(env := SharedMount(config.env_image))
                config = _env_from_image(config, env.acquire(), env.identity)
            if config.weights_image:
                mounts.append(weights := SharedMount(config.weights_image))
                config = _from_image(config, weights.acquire(), weights.identity)
            engine_version = engine.version(_site_packages(config.engine_python))
            tree = _boot(config, engine_version, Path(run_dir))
            code = tree.wait()
            logger.info("engine exited with %s", code)
            return 0 if code in (0, None) else 1
        except _Stop as stop:
            logger.info("%s: stopping the engine", stop)
            return 0
        finally:
            # Whatever phase was interrupted (cold boot, warm-up, dump, restore, serving), stop
            # every tree this run started; a second Ctrl-C must not cut that short.
            with _captured_signals(_already_stopping):
                stop_all()
                if config.rpc_dir is not None:
                    shutil.rmtree(config.rpc_dir, ignore_errors=True)
                for mount in reversed(mounts):
                    mount.release()  # after the engines: they have files open there


def rpc_dir(config: ServeConfig) -> Path:
    """The engine's socket directory: one per listening address, which one engine at a time
    holds, so the path is the same when a snapshot taken there is restored (CRIU re-binds the
    sockets where they were); it is emptied before every boot and removed at exit. Short, under
    /run: a unix socket path has at most 107 bytes, and vLLM appends a 36-character uuid."""
    base = Path("/run/fastboot") if os.access("/run", os.W_OK) else Path("/tmp")
    host = zlib.crc32((config.host or "0.0.0.0").encode()) % 100000
    return base / f"rpc-{config.port or 8000}-{host}"


def _fresh_dir(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.mkdir(mode=0o700)


def _from_image(config: ServeConfig, mountpoint: Path, identity: dict[str, Any]) -> ServeConfig:
    """vLLM gets the mountpoint as MODEL and, unless the flags name one, MODEL as the name it
    serves under, so clients use the same name as with `fastboot serve MODEL`."""
    argv = list(config.engine_argv)
    if any(a.replace("_", "-").split("=")[0] == "--model" for a in argv):
        raise UsageError(
            "with --fastboot-weights-image, give MODEL first (the name clients use) instead of "
            "--model: the engine's model is the image's mountpoint"
        )
    if not any(a.replace("_", "-").split("=")[0] == "--served-model-name" for a in argv):
        argv += ["--served-model-name", config.model]
    return replace(config, model=str(mountpoint), engine_argv=argv, model_identity=identity)


#: NCCL transports that hold device mappings or shared buffers across processes, which a
#: per-process CUDA checkpoint cannot capture (docs/gpu.md, "Multi-GPU"): off for a
#: tensor-parallel engine. Experimental: what this costs in all-reduce throughput is unmeasured.
NCCL_CHECKPOINT_ENV = {
    "NCCL_P2P_DISABLE": "1",
    "NCCL_NVLS_ENABLE": "0",
    "NCCL_SHM_DISABLE": "1",
    "NCCL_IB_DISABLE": "1",
}


def tensor_parallel_env(engine_argv: list[str], env: dict[str, str]) -> dict[str, str]:
    """NCCL_CHECKPOINT_ENV for an engine with a tensor-parallel size above 1, except what env
    already sets (the user's choice wins); {} otherwise."""
    size = 1
    for i, arg in enumerate(engine_argv):
        name, eq, value = arg.replace("_", "-").partition("=")
        if name in ("--tensor-parallel-size", "-tp"):
            value = value if eq else (engine_argv[i + 1] if i + 1 < len(engine_argv) else "")
            size = int(value) if value.isdigit() else size
    if size <= 1:
        return {}
    chosen = {k: v for k, v in NCCL_CHECKPOINT_ENV.items() if k not in env}
    logger.warning(
        "tensor parallel size %d: experimental; NCCL's P2P, NVLS, SHM and IB transports are "
        "off so the CUDA checkpoint can capture each rank (%s); the all-reduce cost of that "
        "is unmeasured",
        size,
        " ".join(f"{k}={v}" for k, v in chosen.items()) or "already set",
    )
    return chosen


def _env_from_image(config: ServeConfig, mountpoint: Path, identity: dict[str, Any]) -> ServeConfig:
    """The engine is run as `MOUNT/bin/python -m vllm...`: a virtual environment's interpreter
    finds its site-packages through MOUNT/pyvenv.cfg wherever the environment is, while the
    #! lines of its scripts still name the directory it was built from (so no script is run).
    The stable mountpoint keeps the paths of mapped libraries the same at restore."""
    python = mountpoint / "bin" / "python"
    if not (mountpoint / "pyvenv.cfg").is_file() or not os.path.exists(python):
        raise UsageError(
            f"image {config.env_image!r} is not a virtual environment (no pyvenv.cfg and "
            "bin/python at its top): build it from one, "
            "e.g. `fastboot image build .venv --name env`"
        )
    return replace(config, engine_python=python, environment=identity)


def _site_packages(python: Path | None) -> list[str] | None:
    """The site-packages directories of the environment whose interpreter is python."""
    if python is None:
        return None
    return [str(p) for p in sorted(python.parent.parent.glob("lib/python3*/site-packages"))]


def _boot(config: ServeConfig, engine_version: str, run_dir: Path) -> EngineTree:
    if not config.snapshot:
        tree, _, _ = _cold_boot(config, run_dir)
        return tree
    store = config.store
    # Saved only where the store directory exists: a boot that publishes nothing writes nothing.
    digests = DigestCache(store.root / DIGEST_CACHE)
    try:
        snapshot_id, key = snapshot_key(config, engine_version, digests)
        host_fp = fingerprint.current(f"{config.engine} {engine_version}", gpu=True)
        if not config.refresh:
            restored = _try_restore(config, store, snapshot_id, host_fp, run_dir, digests)
            if restored is not None:
                return restored
        return _cold_boot_and_snapshot(config, store, snapshot_id, key, host_fp, run_dir, digests)
    finally:
        digests.save()


def _try_restore(
    config: ServeConfig,
    store: Store,
    snapshot_id: SnapshotId,
    host_fp: fingerprint.Fingerprint,
    run_dir: Path,
    digests: DigestCache,
) -> EngineTree | None:
    """A ready, oracle-checked restored engine, or None (reason logged) for a cold boot."""
    if not store.path(snapshot_id).exists():
        logger.info("no snapshot %s yet: cold boot", snapshot_id[:12])
        return None
    start = time.monotonic()
    try:
        manifest = store.verify(snapshot_id, digests)
        logger.debug(
            "verified %d files in %.3f s (%d hashed, %d unchanged since hashed)",
            len(manifest.files),
            time.monotonic() - start,
            digests.misses,
            digests.hits,
        )
        if why := fingerprint.incompatibility(manifest.fingerprint, host_fp):
            logger.warning(
                "snapshot %s does not fit this host (%s): cold boot", snapshot_id[:12], why
            )
            return None
        criu = criu_mod.find_criu()
        step = time.monotonic()
        _fresh_dir(config.rpc_dir)  # the sockets are re-bound here, as they were at the dump
        tree = _restore(criu, store.path(snapshot_id), manifest, attempt_dir(run_dir, "restore"))
        logger.debug("criu restore took %.3f s", time.monotonic() - step)
    except (FastbootError, OSError) as exc:
        hint = "; see `fastboot doctor`" if isinstance(exc, CriuMissingError) else ""
        logger.warning("not restoring snapshot %s: %s%s; cold boot", snapshot_id[:12], exc, hint)
        return None
    try:
        step = time.monotonic()
        model = engines.get(config.engine).wait_ready(
            config.url, config.restore_timeout_s, tree.alive
        )
        hooks.load(config.hooks).resume(config.url)
        logger.debug("restored engine answered in %.3f s", time.monotonic() - step)
        step = time.monotonic()
        check_oracle(config.url, model, manifest)
        logger.debug("oracle matched in %.3f s", time.monotonic() - step)
    except (FastbootError, OSError) as exc:
        logger.warning(
            "restored snapshot %s failed its check (%s): cold boot", snapshot_id[:12], exc
        )
        tree.stop()
        return None
    elapsed = time.monotonic() - start
    logger.info(
        "restored snapshot %s in %.2f s; cold boot was %.1f s",
        snapshot_id[:12],
        elapsed,
        manifest.cold_boot_s,
    )
    return tree


def _restore(criu: criu_mod.Criu, path: Path, manifest: Manifest, workdir: Path) -> EngineTree:
    with shm.criu_lock():
        placed = shm.put_back(path / "shm")
        try:
            tree = restore_and_adopt(
                workdir,
                lambda fd: criu_mod.restore(
                    criu, path / "images", workdir, manifest.stdio_pipe, fd
                ),
                manifest.stdio_pipe,
                stdout_sink(),
            )
        finally:
            # CRIU consumed its link_remap files; the engine keeps the psm_* segments it needs.
            shm.remove([n for n in placed if n.startswith("link_remap.")])
    tree.shm_names = {n for n in placed if not n.startswith("link_remap.")}
    gpu_after_restore(tree, manifest)
    return tree


def _cold_boot(config: ServeConfig, run_dir: Path) -> tuple[EngineTree, float, str]:
    """A ready cold-booted engine, the seconds it took, and the model name it serves."""
    start = time.monotonic()
    engine = engines.get(config.engine)
    argv = engine.command(config.model, config.engine_argv, config.engine_python)
    env = engine_env(run_dir)
    env.update(tensor_parallel_env(config.engine_argv, env))
    if config.engine_python is not None:
        # What `activate` would set: tools the engine runs by name come from its environment.
        env["VIRTUAL_ENV"] = str(config.engine_python.parent.parent)
        env["PATH"] = f"{config.engine_python.parent}{os.pathsep}{env.get('PATH', '')}"
    if config.rpc_dir is not None:
        _fresh_dir(config.rpc_dir)
        env["VLLM_RPC_BASE_PATH"] = str(config.rpc_dir)
    tree = EngineTree.spawn(argv, env, stdout_sink())
    try:
        model = engine.wait_ready(config.url, config.ready_timeout_s, tree.alive)
    except vllm.EngineError as exc:
        tree.stop()
        raise vllm.EngineError(
            f"cold boot failed: {exc}; last engine output:\n{tree.log_tail()}"
        ) from exc
    elapsed = time.monotonic() - start
    logger.info("cold boot ready in %.1f s", elapsed)
    if engine.HAS_PLUGIN:
        check_plugin(run_dir)
    return tree, elapsed, model


def _cold_boot_and_snapshot(
    config: ServeConfig,
    store: Store,
    snapshot_id: SnapshotId,
    key: dict[str, Any],
    host_fp: fingerprint.Fingerprint,
    run_dir: Path,
    digests: DigestCache,
) -> EngineTree:
    tree, cold_s, model = _cold_boot(config, run_dir)
    target = Target(store, snapshot_id, key, host_fp, config.engine_argv, digests, config.hooks)
    if take(tree, config.url, model, cold_s, target, run_dir) is None:
        logger.warning("serving without a snapshot")
        return tree
    restored = _try_restore(config, store, snapshot_id, host_fp, run_dir, digests)
    if restored is None:
        # The fresh snapshot does not restore here: never keep it, and serve from a cold boot.
        shutil.rmtree(store.path(snapshot_id), ignore_errors=True)
        logger.warning("the new snapshot %s did not restore; removed it", snapshot_id[:12])
        tree, _, _ = _cold_boot(config, run_dir)
        return tree
    return restored
