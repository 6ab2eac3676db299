"""`fastboot serve MODEL ... --fastboot-isolated`: serve as one replica, published on the user's
--host/--port.

The engine runs the way the agent runs replicas (fastboot.snapshot.isolation): in its own
network, mount and pid namespaces, listening on 0.0.0.0:8000 inside; a relay (fastboot.host.relay)
publishes it where the user asked. Its snapshot is the same one `fastboot snapshot create`
makes from the same flags (--host/--port are not part of it), so the snapshot a user warmed with
`fastboot serve` is the one agents restore as many replicas, on this host or another.

    first run:  fastboot snapshot create (cold boot, warm up, oracle, dump, proved by a restore)
                -> restore into this run's namespace -> oracle -> relay -> serve
    later runs: verify -> restore -> oracle -> relay -> serve
    anything wrong: the reason is logged and the engine cold boots in the namespace, unsnapshotted
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fastboot.host import netns
from fastboot.engines import hooks, vllm
from fastboot.errors import FastbootError
from fastboot.host.relay import Relay
from fastboot.snapshot import fingerprint
from fastboot.snapshot.create import (
    DIGEST_CACHE,
    CreateConfig,
    check_oracle,
    create_isolated,
    isolated_env,
    isolated_target,
    restore_isolated,
)
from fastboot.snapshot.digests import DigestCache
from fastboot.host.supervisor import EngineTree, become_subreaper, stdout_sink, stop_all

if TYPE_CHECKING:
    from fastboot.serve import ServeConfig

logger = logging.getLogger(__name__)

#: The port the engine listens on inside its namespace (as for every replica).
INNER_PORT = 8000
#: Links of `fastboot serve --fastboot-isolated` runs (one /30 per serving process).
SERVE_SUBNET = "10.211.0.0/16"
_LISTEN_FLAGS = ("--host", "--port")


def strip_listen_flags(argv: list[str]) -> list[str]:
    """argv without --host/--port (as `--port 8001` or `--port=8001`): the relay takes them."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _LISTEN_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f"{f}=" for f in _LISTEN_FLAGS)):
            out.append(arg)
    return out


def serve_isolated(config: ServeConfig) -> int:
    """Run until the engine exits or SIGINT/SIGTERM; returns the exit code (see module doc)."""
    from fastboot.serve import _already_stopping, _captured_signals, _Stop

    inner = CreateConfig(
        model=config.model,
        engine_argv=strip_listen_flags(config.engine_argv),
        store=config.store,
        port=INNER_PORT,
        hooks=config.hooks,
        ready_timeout_s=config.ready_timeout_s,
    )
    hooks.load(config.hooks)
    become_subreaper()
    pid = os.getpid()
    link = netns.create(f"fb-serve-{pid}", f"fbv{pid % 100000}", SERVE_SUBNET, pid % 16384)
    relay = Relay(config.host or "0.0.0.0", config.port or 8000, link.ip, INNER_PORT)
    with _captured_signals(), tempfile.TemporaryDirectory(prefix="fastboot-run-") as run_dir:
        try:
            relay.bind()  # a busy port fails before any boot
            tree = _boot(config.snapshot, config.refresh, inner, link, Path(run_dir))
            relay.start()  # only a checked engine (oracle matched) gets traffic
            logger.info(
                "serving on %s:%d (engine at %s:%d)",
                relay.host,
                relay.port,
                link.ip,
                INNER_PORT,
            )
            code = tree.wait()
            logger.info("engine exited with %s", code)
            return 0 if code in (0, None) else 1
        except _Stop as stop:
            logger.info("%s: stopping the engine", stop)
            return 0
        finally:
            with _captured_signals(_already_stopping):
                relay.stop()
                stop_all()
                netns.delete(link)


def _boot(
    snapshot: bool, refresh: bool, inner: CreateConfig, link: netns.Link, run_dir: Path
) -> EngineTree:
    if not snapshot:
        return _cold_boot(inner, link, run_dir)
    digests = DigestCache(inner.store.root / DIGEST_CACHE)
    try:
        snapshot_id = isolated_target(inner, digests).snapshot_id
        if not refresh and (tree := _try_restore(inner, snapshot_id, link, run_dir, digests)):
            return tree
        logger.info("making snapshot %s (cold boot in its own namespaces)", snapshot_id[:12])
        try:
            create_isolated(inner)
        except (FastbootError, OSError) as exc:
            logger.warning("serving without a snapshot: %s", exc)
            return _cold_boot(inner, link, run_dir)
        tree = _try_restore(inner, snapshot_id, link, run_dir, digests)
        return tree or _cold_boot(inner, link, run_dir)
    finally:
        digests.save()


def _try_restore(
    inner: CreateConfig, snapshot_id: str, link: netns.Link, run_dir: Path, digests: DigestCache
) -> EngineTree | None:
    """A ready, oracle-checked replica in link's namespace, or None (reason logged)."""
    store = inner.store
    if not store.path(snapshot_id).exists():
        logger.info("no snapshot %s yet", snapshot_id[:12])
        return None
    start = time.monotonic()
    try:
        manifest = store.verify(snapshot_id, digests)
        host = fingerprint.current(f"{vllm.NAME} {vllm.version()}", gpu=True)
        if why := fingerprint.incompatibility(manifest.fingerprint, host):
            logger.warning("snapshot %s does not fit this host (%s)", snapshot_id[:12], why)
            return None
        tree = restore_isolated(store, manifest, link, run_dir)
    except (FastbootError, OSError) as exc:
        logger.warning("not restoring snapshot %s: %s", snapshot_id[:12], exc)
        return None
    url = f"http://{link.ip}:{INNER_PORT}"
    try:
        model = vllm.wait_ready(url, 120, tree.alive)
        hooks.load(inner.hooks).resume(url)
        check_oracle(url, model, manifest)
    except (FastbootError, OSError) as exc:
        logger.warning("restored snapshot %s failed its check (%s)", snapshot_id[:12], exc)
        tree.stop()
        return None
    logger.info(
        "restored snapshot %s in %.2f s; cold boot was %.1f s",
        snapshot_id[:12],
        time.monotonic() - start,
        manifest.cold_boot_s,
    )
    return tree


def _cold_boot(inner: CreateConfig, link: netns.Link, run_dir: Path) -> EngineTree:
    start = time.monotonic()
    argv = [*inner.engine_argv, "--host", "0.0.0.0", "--port", str(INNER_PORT)]
    tree = EngineTree.spawn(
        vllm.command(inner.model, argv), isolated_env(run_dir), stdout_sink(), link.netns
    )
    try:
        vllm.wait_ready(f"http://{link.ip}:{INNER_PORT}", inner.ready_timeout_s, tree.alive)
    except vllm.EngineError as exc:
        tree.stop()
        raise vllm.EngineError(
            f"cold boot failed: {exc}; last engine output:\n{tree.log_tail()}"
        ) from exc
    logger.info("cold boot ready in %.1f s", time.monotonic() - start)
    return tree
