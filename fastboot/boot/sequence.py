"""The one boot sequence: restore a verified snapshot, else cold boot, warm up, snapshot, prove.

    boot()      `fastboot serve`, either layout:
                  verify -> fingerprint -> restore -> ready -> resume hooks -> oracle -> serve
                  (any failure: log why, stop what was restored, fall through to a cold boot)
                  cold boot -> ready -> warm up -> oracle -> quiesce -> dump -> publish
                    -> restore (the proof, served) ; dump failed: serve the resumed engine ;
                    the proof failed: remove the snapshot, cold boot again, serve that
    create()    `fastboot snapshot create`: cold boot -> ... -> publish -> restore elsewhere
                  (the proof, then stopped); any failure raises, nothing unproven is kept
    restore()   the agent's replicas (and every restore above): restore -> ready -> resume
                  hooks -> oracle, raising on failure; verify() first, once per snapshot

Parameterised by a Site (fastboot.boot.site: where the engine runs) and an Engine adapter
(fastboot.engines). Fail open to a cold boot, never to a wrong answer: a restored engine serves
only after it reproduced the oracle's token ids.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fastboot.boot.environment import check_plugin, engine_env
from fastboot.boot.site import Site
from fastboot.engines import Engine, EngineError, hooks
from fastboot.errors import CriuMissingError, FastbootError, UsageError
from fastboot.host.supervisor import EngineTree
from fastboot.snapshot import cpu_levels, fingerprint
from fastboot.snapshot.digests import DIGEST_CACHE, DigestCache
from fastboot.snapshot.store import Manifest, SnapshotId, SnapshotInvalid, Store
from fastboot.snapshot.take import Taken, Target, dump_and_publish

logger = logging.getLogger(__name__)

#: How long a restored engine may take to answer, unless the caller says.
RESTORE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class BootSpec:
    """What engine to boot, and how long each phase may take."""

    engine: Engine
    model: str
    """MODEL as the engine gets it (a directory, a hub name, an image's mountpoint)."""
    engine_argv: list[str]
    """Flags as the engine runs them (the site's applied: Site.engine_argv)."""
    python: Path | None = None
    """The interpreter that runs the engine (None: the engine beside fastboot)."""
    hooks: str | None = None
    """Module with quiesce/resume hooks (fastboot.engines.hooks)."""
    ready_timeout_s: float = 900.0
    """How long a cold boot may take to answer."""
    restore_timeout_s: float = RESTORE_TIMEOUT_S
    """How long a restored engine may take to answer."""
    cpu_baseline: str = cpu_levels.NATIVE
    """The level the engine's code is held to (fastboot.snapshot.cpu_levels)."""


@dataclass(frozen=True)
class ColdBoot:
    tree: EngineTree
    seconds: float
    model: str
    """The model name the engine serves."""


def host_fingerprint(engine: Engine, engine_version: str) -> fingerprint.Fingerprint:
    """This host as a snapshot of that engine must find it."""
    return fingerprint.current(f"{engine.NAME} {engine_version}", gpu=True)


def checked_baseline(engine: Engine, level: str) -> str:
    """level, if this host and engine can be held to it; UsageError saying why not."""
    if level == cpu_levels.NATIVE:
        return level
    if level not in cpu_levels.BASELINES:
        raise UsageError(
            f"unknown CPU baseline {level!r}: one of {', '.join(cpu_levels.BASELINES)}"
        )
    order = list(cpu_levels.LEVELS)
    if order.index(level) < order.index(engine.CPU_FLOOR):
        raise UsageError(f"{engine.NAME} does not run below {engine.CPU_FLOOR} (asked: {level})")
    _, flags = fingerprint.cpu_info()
    if lacking := cpu_levels.missing(level, flags):
        raise UsageError(f"this CPU is below {level}: it lacks {', '.join(lacking)}")
    return level


def digest_cache(store: Store) -> DigestCache:
    """The store's digest cache (saved only where the store directory exists)."""
    return DigestCache(store.root / DIGEST_CACHE)


# -- the pieces --------------------------------------------------------------------------------


def verify(
    store: Store, snapshot_id: str, digests: DigestCache, host: fingerprint.Fingerprint
) -> Manifest:
    """The manifest of a snapshot whose files match it and that fits this host; SnapshotInvalid
    (saying which) otherwise."""
    manifest = verified(store, snapshot_id, digests)
    if why := fingerprint.incompatibility(manifest.fingerprint, host):
        raise SnapshotInvalid(f"snapshot {manifest.id} does not fit this host: {why}")
    return manifest


def verified(store: Store, snapshot_id: str, digests: DigestCache) -> Manifest:
    """The manifest, after checking every file against it (store.verify), timed at DEBUG."""
    start = time.monotonic()
    manifest = store.verify(snapshot_id, digests)
    logger.debug(
        "verified %d files in %.3f s (%d hashed, %d unchanged since hashed)",
        len(manifest.files),
        time.monotonic() - start,
        digests.misses,
        digests.hits,
    )
    return manifest


def restore(
    engine: Engine,
    site: Site,
    store: Store,
    manifest: Manifest,
    run_dir: Path,
    *,
    hooks_module: str | None,
    timeout_s: float,
    adopted: Callable[[EngineTree], None] | None = None,
    mounted: Path | None = None,
) -> EngineTree:
    """Restore a verified snapshot at site and check() it; adopted(tree) runs between the
    restore and the checks. Raises on any failure, with the restored tree stopped. mounted:
    the snapshot is not in store but lazily mounted there (LazySnapshot.path)."""
    step = time.monotonic()
    path = mounted or store.path(manifest.id)
    tree = site.restore(path, manifest, run_dir, mounted is not None)
    logger.debug("criu restore took %.3f s", time.monotonic() - step)
    if adopted is not None:
        try:
            adopted(tree)
        except BaseException:
            tree.stop()
            raise
    check(engine, site, tree, manifest, hooks_module=hooks_module, timeout_s=timeout_s)
    return tree


def check(
    engine: Engine,
    site: Site,
    tree: EngineTree,
    manifest: Manifest,
    *,
    hooks_module: str | None,
    timeout_s: float,
) -> None:
    """A restored engine is ready within timeout_s, resumed (the engine's own quiesce undone,
    then hooks_module's), and reproduces the snapshot's oracle. Raises otherwise, with the
    tree stopped."""
    try:
        step = time.monotonic()
        model = engine.wait_ready(site.url, timeout_s, tree.alive)
        engine.resume(site.url)
        hooks.load(hooks_module).resume(site.url)
        logger.debug("restored engine answered in %.3f s", time.monotonic() - step)
        step = time.monotonic()
        engine.check_oracle(site.url, model, manifest.oracle)
        logger.debug("oracle matched in %.3f s", time.monotonic() - step)
    except BaseException:
        tree.stop()
        raise


def cold_boot(spec: BootSpec, site: Site, run_dir: Path) -> ColdBoot:
    """A ready cold-booted engine at site; EngineError (with its last output) otherwise."""
    start = time.monotonic()
    argv = spec.engine.command(spec.model, spec.engine_argv, spec.python)
    env = engine_env(
        spec.engine, spec.engine_argv, run_dir, site.socket_dir, spec.python, spec.cpu_baseline
    )
    tree = site.spawn(argv, env)
    try:
        model = spec.engine.wait_ready(site.url, spec.ready_timeout_s, tree.alive)
    except EngineError as exc:
        tree.stop()
        raise EngineError(
            f"cold boot failed: {exc}; last engine output:\n{tree.log_tail()}"
        ) from exc
    elapsed = time.monotonic() - start
    logger.info("cold boot ready in %.1f s", elapsed)
    if spec.engine.HAS_PLUGIN:
        check_plugin(run_dir)
    return ColdBoot(tree, elapsed, model)


def take_snapshot(
    spec: BootSpec, site: Site, cold: ColdBoot, target: Target, run_dir: Path
) -> Manifest | None:
    """Warm up, record the oracle, quiesce, dump (the tree dies) and publish. None, with the
    reason logged, when it could not be taken: the engine then still runs (CRIU resumes a tree
    whose dump failed, and so does fastboot's quiesce) and the caller may serve it."""
    url, user_hooks = site.url, hooks.load(spec.hooks)
    quiesced = False
    try:
        spec.engine.warm_up(url, cold.model)
        oracle = spec.engine.oracle(url, cold.model)
        user_hooks.quiesce(url)
        spec.engine.quiesce(url)
        quiesced = True
        manifest = dump_and_publish(
            cold.tree, target, Taken(cold.model, oracle, cold.seconds), run_dir
        )
    except (FastbootError, OSError) as exc:
        logger.warning("no snapshot: %s", exc)
        if quiesced and cold.tree.alive():
            spec.engine.resume(url)
            user_hooks.resume(url)
        return None
    logger.info(
        "snapshot %s published: %.2f GB, dumped in %.1f s",
        target.snapshot_id[:12],
        manifest.total_bytes / 1e9,
        manifest.dump_s,
    )
    return manifest


# -- the sequences -----------------------------------------------------------------------------


class LazySnapshot(Protocol):
    """A snapshot mounted from a remote for a restore (fastboot.imagefs.lazy_snapshots)."""

    manifest: Manifest
    path: Path
    seconds: float
    """Record, index, checks, and the fetch or the mount."""
    mounted: bool
    """True: path is the mounted image (restored from the mount, pages mapped from it); False:
    the snapshot was fetched into the local store and path is its directory there."""

    def fetch_rest(self) -> None:
        """Bring the rest of it local in the background."""

    def release(self) -> None:
        """Drop the mount (after every engine restored from it has exited)."""


class SnapshotRemote(Protocol):
    """Where snapshots this host lacks are restored from, lazily (`--fastboot-snapshot-remote`)."""

    url: str

    def open(self, snapshot_id: str) -> LazySnapshot | None:
        """The snapshot mounted, its chain of trust checked; None when the remote lacks it."""


def try_restore(
    spec: BootSpec,
    site: Site,
    target: Target,
    run_dir: Path,
    remote: SnapshotRemote | None = None,
) -> EngineTree | None:
    """A ready, oracle-checked restored engine at site, or None (reason logged) for a cold boot.
    A snapshot missing here is restored lazily from remote, if given and it has it."""
    snapshot_id, store = target.snapshot_id, target.store
    if not store.path(snapshot_id).exists():
        if remote is None:
            logger.info("no snapshot %s yet: cold boot", snapshot_id[:12])
            return None
        return _try_remote(spec, site, target, run_dir, remote)
    start = time.monotonic()
    try:
        manifest = verified(store, snapshot_id, target.digests)
    except (FastbootError, OSError) as exc:
        logger.warning("not restoring snapshot %s: %s; cold boot", snapshot_id[:12], exc)
        return None
    tree = _restore_checked(spec, site, target, store.path(snapshot_id), manifest, run_dir)
    if tree is not None:
        logger.info(
            "restored snapshot %s in %.2f s; cold boot was %.1f s",
            snapshot_id[:12],
            time.monotonic() - start,
            manifest.cold_boot_s,
        )
    return tree


def _try_remote(
    spec: BootSpec, site: Site, target: Target, run_dir: Path, remote: SnapshotRemote
) -> EngineTree | None:
    snapshot_id, start = target.snapshot_id, time.monotonic()
    try:
        lazy = remote.open(snapshot_id)
    except (FastbootError, OSError) as exc:
        logger.warning(
            "not restoring snapshot %s from %s: %s; cold boot", snapshot_id[:12], remote.url, exc
        )
        return None
    if lazy is None:
        logger.info("no snapshot %s here or on %s yet: cold boot", snapshot_id[:12], remote.url)
        return None
    tree = _restore_checked(
        spec, site, target, lazy.path, lazy.manifest, run_dir, from_mount=lazy.mounted
    )
    if tree is None:
        lazy.release()
        return None
    logger.info(
        "restored snapshot %s in %.2f s; cold boot was %.1f s (lazily from %s: %s in %.2f s)",
        snapshot_id[:12],
        time.monotonic() - start,
        lazy.manifest.cold_boot_s,
        remote.url,
        "mounted and checked" if lazy.mounted else "fetched and checked",
        lazy.seconds,
    )
    lazy.fetch_rest()
    return tree


def _restore_checked(
    spec: BootSpec,
    site: Site,
    target: Target,
    path: Path,
    manifest: Manifest,
    run_dir: Path,
    from_mount: bool = False,
) -> EngineTree | None:
    """restore() of a verified manifest's snapshot at path, fingerprint first; None (reason
    logged, nothing left running) when it does not fit, fails or fails its check."""
    snapshot_id = manifest.id
    if why := fingerprint.incompatibility(manifest.fingerprint, target.host):
        logger.warning("snapshot %s does not fit this host (%s): cold boot", snapshot_id[:12], why)
        return None
    try:
        step = time.monotonic()
        tree = site.restore(path, manifest, run_dir, from_mount)
        logger.debug("criu restore took %.3f s", time.monotonic() - step)
    except (FastbootError, OSError) as exc:
        hint = "; see `fastboot doctor`" if isinstance(exc, CriuMissingError) else ""
        logger.warning("not restoring snapshot %s: %s%s; cold boot", snapshot_id[:12], exc, hint)
        return None
    try:
        check(
            spec.engine,
            site,
            tree,
            manifest,
            hooks_module=spec.hooks,
            timeout_s=spec.restore_timeout_s,
        )
    except (FastbootError, OSError) as exc:
        logger.warning(
            "restored snapshot %s failed its check (%s): cold boot", snapshot_id[:12], exc
        )
        return None
    return tree


def boot(
    spec: BootSpec,
    site: Site,
    target: Target | None,
    run_dir: Path,
    refresh: bool = False,
    remote: SnapshotRemote | None = None,
) -> EngineTree:
    """A ready engine at site: restored from target's snapshot (here, else lazily from remote),
    else cold-booted (and snapshotted into target, proven by the restore that is then served).
    target None: a plain cold boot, no snapshot read or written."""
    if target is None:
        return cold_boot(spec, site, run_dir).tree
    restored = None if refresh else try_restore(spec, site, target, run_dir, remote)
    if restored is not None:
        return restored
    cold = cold_boot(spec, site, run_dir)
    if take_snapshot(spec, site, cold, target, run_dir) is None:
        logger.warning("serving without a snapshot")
        return cold.tree
    if (restored := try_restore(spec, site, target, run_dir)) is not None:
        return restored
    # The fresh snapshot does not restore here: never keep it, and serve from a cold boot.
    shutil.rmtree(target.store.path(target.snapshot_id), ignore_errors=True)
    logger.warning("the new snapshot %s did not restore; removed it", target.snapshot_id[:12])
    return cold_boot(spec, site, run_dir).tree


def create(
    spec: BootSpec, site: Site, probe: Callable[[], Site], target: Target, run_dir: Path
) -> Manifest:
    """Cold boot at site, snapshot into target, and prove the snapshot restores (once, at the
    site probe() makes, oracle checked, then stopped) before returning its manifest. A snapshot
    that does not restore is removed, never left for an agent to find."""
    cold = cold_boot(spec, site, run_dir)
    manifest = take_snapshot(spec, site, cold, target, run_dir)
    cold.tree.stop()
    if manifest is None:
        raise FastbootError("the engine could not be snapshotted (reason above)")
    try:
        proof = restore(
            spec.engine,
            probe(),
            target.store,
            manifest,
            run_dir,
            hooks_module=spec.hooks,
            timeout_s=spec.restore_timeout_s,
        )
    except (FastbootError, OSError) as exc:
        target.store.remove(manifest.id)
        raise FastbootError(f"the new snapshot did not restore ({exc}); removed it") from exc
    proof.stop()
    logger.info("snapshot %s restores and reproduces its oracle", manifest.id[:12])
    return manifest


def new_target(
    spec: BootSpec,
    site: Site,
    store: Store,
    snapshot: tuple[SnapshotId, dict[str, object]],
    host: fingerprint.Fingerprint,
    digests: DigestCache,
) -> Target:
    """Where a snapshot of spec at site goes (snapshot: its id and key, fastboot.snapshot.key)."""
    snapshot_id, key = snapshot
    return Target(
        store=store,
        snapshot_id=snapshot_id,
        key=dict(key),
        host=host,
        engine_argv=spec.engine_argv,
        digests=digests,
        hooks=spec.hooks,
        isolation=site.isolation,
        cpu_baseline=spec.cpu_baseline,
    )
