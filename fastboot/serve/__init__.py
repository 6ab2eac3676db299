"""`fastboot serve`: a drop-in for `vllm serve` that restores a warmed engine from a snapshot.

This module turns a ServeConfig (fastboot.serve.config) into one run of the boot sequence
(fastboot.boot.sequence) at a HostSite, or an IsolatedSite for `--fastboot-isolated`
(fastboot.serve.isolated), and owns what the run holds around it: the image mounts the engine
runs from and the engine's socket directory (signals and stopping every engine tree on the way
out: fastboot.serve.config.run_until_stopped).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastboot import engines, envs
from fastboot.boot import sequence
from fastboot.boot.site import HostSite
from fastboot.engines import hooks
from fastboot.errors import UsageError
from fastboot.host.supervisor import EngineTree, become_subreaper
from fastboot.serve.config import ServeConfig, run_until_stopped
from fastboot.serve.isolated import serve_isolated
from fastboot.snapshot.digests import DigestCache
from fastboot.snapshot.key import model_identity
from fastboot.snapshot.key import snapshot_key as make_key
from fastboot.snapshot.store import SnapshotId

__all__ = ["ServeConfig", "check_port_free", "free_port", "rpc_dir", "serve", "snapshot_key"]

logger = logging.getLogger(__name__)


def snapshot_key(
    config: ServeConfig, engine_version: str, cache: DigestCache | None = None
) -> tuple[SnapshotId, dict[str, Any]]:
    """The snapshot id and key of a host-layout `fastboot serve` (fastboot.snapshot.key)."""
    engine = engines.get(config.engine, config.engine_options)
    named = engine.key_paths(config.model, config.engine_argv)
    return make_key(
        engine=config.engine,
        engine_version=engine_version,
        argv=config.engine_argv,
        model=config.model_identity or model_identity(config.model, cache, named),
        env_prefixes=engine.ENV_PREFIXES,
        environment=config.environment,
        engine_options=engine.options(),
        cpu_baseline=config.cpu_baseline,
    )


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
    # An unknown engine, or options it does not take, fail before anything starts.
    engine = engines.get(config.engine, config.engine_options)
    if config.engine == "command" and (config.env_image or config.weights_image):
        raise UsageError(
            "--fastboot-engine command takes no --fastboot-env-image/--fastboot-weights-image "
            "(yet): name the files in the server's command instead"
        )
    sequence.checked_baseline(engine, config.cpu_baseline)  # before anything starts
    if config.isolated:
        if config.engine not in engines.ISOLATED:
            raise UsageError(
                f"--fastboot-isolated runs {' and '.join(engines.ISOLATED)}, "
                f"not {config.engine} (yet)"
            )
        for flag, value in (("weights", config.weights_image), ("env", config.env_image)):
            if value:
                raise UsageError(f"--fastboot-isolated does not take --fastboot-{flag}-image yet")
        return serve_isolated(config)
    check_port_free(config.host, config.port)
    config = replace(config, rpc_dir=rpc_dir(config))
    hooks.load(config.hooks)  # a bad --fastboot-hooks fails now, not after a cold boot
    become_subreaper()
    mounts: list[Any] = []  # SharedMounts acquired, released after the engines stopped

    def boot(run_dir: Path) -> EngineTree:
        nonlocal config
        if config.env_image or config.weights_image:
            # The image store may pull in pyfuse3 and trio (the [imagefs] extra): only a run
            # from an image pays for them.
            from fastboot.imagefs.shared import SharedMount
        if config.env_image:
            mounts.append(env := SharedMount(config.env_image))
            config = _env_from_image(config, env.acquire(), env.identity)
        if config.weights_image:
            mounts.append(weights := SharedMount(config.weights_image))
            config = _from_image(config, weights.acquire(), weights.identity)
        remote = None
        if config.snapshot_remote and config.snapshot:
            # pulls in the image store (numpy, zstd): only a run with a remote pays for it
            from fastboot.imagefs.lazy_snapshots import RemoteSnapshots
            from fastboot.imagefs.store import ImageStore

            images = ImageStore(envs.image_store())
            remote = RemoteSnapshots(
                config.snapshot_remote, images, config.store, envs.snapshot_fetch(), mounts
            )
        version = engine.version(_site_packages(config.engine_python))
        return _boot(config, version, run_dir, remote)

    def clean_up() -> None:
        if config.rpc_dir is not None:
            shutil.rmtree(config.rpc_dir, ignore_errors=True)
        for mount in reversed(mounts):
            mount.release()  # after the engines: they have files open there

    return run_until_stopped(boot, clean_up)


def rpc_dir(config: ServeConfig) -> Path:
    """The engine's socket directory: one per listening address, which one engine at a time
    holds, so the path is the same when a snapshot taken there is restored (CRIU re-binds the
    sockets where they were); it is emptied before every boot and removed at exit. Short, under
    /run: a unix socket path has at most 107 bytes, and vLLM appends a 36-character uuid."""
    base = Path("/run/fastboot") if os.access("/run", os.W_OK) else Path("/tmp")
    host = zlib.crc32((config.host or "0.0.0.0").encode()) % 100000
    return base / f"rpc-{config.port or 8000}-{host}"


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


def _boot(
    config: ServeConfig,
    engine_version: str,
    run_dir: Path,
    remote: sequence.SnapshotRemote | None = None,
) -> EngineTree:
    spec = config.boot_spec(config.engine_argv)
    site = HostSite(config.url, config.rpc_dir)
    if not config.snapshot:
        return sequence.boot(spec, site, None, run_dir)
    store = config.store
    digests = sequence.digest_cache(store)
    try:
        target = sequence.new_target(
            spec,
            site,
            store,
            snapshot_key(config, engine_version, digests),
            sequence.host_fingerprint(spec.engine, engine_version),
            digests,
        )
        return sequence.boot(spec, site, target, run_dir, refresh=config.refresh, remote=remote)
    finally:
        digests.save()
