"""The replicas one agent runs: restored in parallel, watched, stopped, and cleaned up.

Each replica is an isolated snapshot (fastboot.snapshot.isolation) restored into its own
network namespace `fb-<agent>-<n>` with a veth `fb<agent>h<n>` to the host and its own /30, so
the host reaches it at its own address while the engine listens on the port it was dumped with.

Ownership: the agent is a child subreaper, so every restored engine is its child and is reaped
by it. A replica that exits on its own is noticed by the watcher (every WATCH_S), reported as
`dead`, and its namespace, link and cgroup are removed. After an agent crash its replicas are
orphans whose stdout pipe has no reader any more, so they are not adopted: a new agent kills
every process inside its own namespaces (found by their network namespace) and removes the
namespaces, links and cgroups before it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import secrets
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from fastboot import engines, envs
from fastboot.boot import sequence
from fastboot.boot.site import IsolatedSite
from fastboot.errors import FastbootError
from fastboot.host import netns
from fastboot.host.cgroups import Limits, ReplicaCgroup, sweep
from fastboot.host.proctree import tree_pids
from fastboot.host.supervisor import EngineTree
from fastboot.snapshot import fingerprint
from fastboot.snapshot.fingerprint import Fingerprint
from fastboot.snapshot.store import Manifest, SnapshotInvalid, Store

logger = logging.getLogger(__name__)

#: How often the watcher looks for replicas that died.
WATCH_S = 0.5
#: Finished replicas (stopped, dead, failed) kept for reporting.
KEEP_FINISHED = 100
LIVE_STATES = ("restoring", "ready")


class NotFound(FastbootError):
    """No such snapshot or replica (HTTP 404)."""


class Conflict(FastbootError):
    """Not enough free slots for the request (HTTP 409)."""


@dataclass(frozen=True)
class AgentConfig:
    """How one agent runs its replicas."""

    name: str
    """Short name ([a-z0-9], at most 6): prefixes its namespaces, links and cgroups."""
    store: Store
    state_dir: Path
    """Replica logs and CRIU work directories."""
    slots: int
    subnet: str = netns.DEFAULT_SUBNET
    routes: tuple[str, ...] = ()
    """Networks replicas answer through the host (a router on another machine); the network
    routes `subnet` to this host, as a host-gateway CNI routes each node's pod range."""
    limits: Limits = field(default_factory=Limits)
    ready_timeout_s: float = sequence.RESTORE_TIMEOUT_S
    """How long a restored replica may take to answer."""
    snapshot_remote: str | None = None
    """Remote image store to restore snapshots the store lacks from, lazily
    (fastboot.imagefs.lazy_snapshots); the mounts stay until the agent exits."""

    @property
    def netns_prefix(self) -> str:
        return f"fb-{self.name}-"

    @property
    def link_prefix(self) -> str:
        return f"fb{self.name}h"


@dataclass
class Replica:
    id: str
    snapshot: str
    model: str
    index: int
    port: int
    created: float
    state: str = "restoring"
    error: str | None = None
    pid: int | None = None
    link: netns.Link | None = None
    restore_s: float | None = None
    ready_s: float | None = None
    tree: EngineTree | None = None
    released: bool = False
    """Its namespace, link and cgroup are gone (set last by the clean-up)."""
    log: BinaryIO | None = None
    """The engine's output goes here (state_dir/logs/ID.log)."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def address(self) -> str | None:
        return f"http://{self.link.ip}:{self.port}" if self.link else None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "snapshot": self.snapshot,
            "model": self.model,
            "state": self.state,
            "address": self.address,
            "base_url": f"{self.address}/v1" if self.address else None,
            "pid": self.pid,
            "created": self.created,
            "age_s": round(time.time() - self.created, 3),
            "timings": {"restore_s": self.restore_s, "ready_s": self.ready_s},
            "error": self.error,
        }


class ReplicaManager:
    """Restores, watches and stops this host's replicas. Methods run on the agent's event
    loop; blocking work (CRIU, readiness, stopping) goes to threads."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.replicas: dict[str, Replica] = {}
        self.digests = sequence.digest_cache(config.store)
        self._hosts: dict[str, Fingerprint] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self.remote: Any = None
        """fastboot.imagefs.lazy_snapshots.RemoteSnapshots, with config.snapshot_remote."""
        self.mounted: dict[str, sequence.LazySnapshot] = {}
        """Remote snapshots mounted here, by id: every later replica restores from the mount."""
        self._records: dict[str, Any] = {}
        """Records (fastboot.imagefs.lazy_snapshots.Record) of remote snapshots asked for and
        not yet brought here, by id."""
        self._bringing: dict[str, asyncio.Future[Any]] = {}

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        (self.config.state_dir / "logs").mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.config.state_dir / "run").mkdir(parents=True, exist_ok=True, mode=0o700)
        cleaned = await asyncio.to_thread(clean_leftovers, self.config)
        if cleaned:
            logger.info("removed what a previous agent left: %s", ", ".join(cleaned))
        self._watcher = asyncio.create_task(self._watch())

    async def close(self) -> None:
        """Stop every replica and remove its namespace (agent shutdown)."""
        if self._watcher:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        # Restores in flight finish first (threads cannot be cancelled), then everything stops.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        live = [r for r in self.replicas.values() if r.state in LIVE_STATES]
        await asyncio.gather(*(self.stop(r.id) for r in live), return_exceptions=True)
        sweep(self.config.name, keep=set())
        for lazy in self.mounted.values():
            await asyncio.to_thread(lazy.release)  # after the replicas that map it
        self.mounted.clear()

    # -- queries ---------------------------------------------------------------------------

    @property
    def slots_used(self) -> int:
        return sum(1 for r in self.replicas.values() if r.state in LIVE_STATES)

    def get(self, replica_id: str) -> Replica:
        try:
            return self.replicas[replica_id]
        except KeyError:
            raise NotFound(f"no replica {replica_id!r} on this agent") from None

    def snapshots(self) -> list[Manifest]:
        return [m for m in self.config.store.list() if isinstance(m, Manifest) and m.isolation]

    def snapshot(self, prefix: str) -> Manifest:
        try:
            snapshot_id = self.config.store.resolve(prefix)
            manifest = self.config.store.read_manifest(snapshot_id)
        except (SnapshotInvalid, FileNotFoundError) as exc:
            raise NotFound(f"no snapshot {prefix!r} on this agent ({exc})") from exc
        if not manifest.isolation:
            raise NotFound(
                f"snapshot {snapshot_id} was taken by `fastboot serve`, not for replicas; "
                "make one with `fastboot snapshot create`"
            )
        return manifest

    # -- actions ---------------------------------------------------------------------------

    def unfit(self, manifest: Manifest) -> str | None:
        """Why this host cannot restore manifest (fingerprint.incompatibility), or None."""
        return fingerprint.incompatibility(manifest.fingerprint, self._host(_engine(manifest)))

    def choose(self, prefixes: Sequence[str]) -> Manifest:
        """The first of prefixes (snapshots of one model, one per host type, preferred first)
        that this agent holds and this host can restore. NotFound when it holds none of them,
        SnapshotInvalid naming each one's reason when none fits."""
        reasons, held = [], False
        for prefix in prefixes:
            try:
                manifest = self.snapshot(prefix)
            except NotFound as exc:
                reasons.append(str(exc))
                continue
            held = True
            if (why := self.unfit(manifest)) is None:
                return manifest
            reasons.append(f"snapshot {manifest.id} does not fit this host: {why}")
        if not held:
            raise NotFound("; ".join(reasons))
        raise SnapshotInvalid("; ".join(reasons))

    async def restore(self, prefixes: str | Sequence[str], count: int) -> list[Replica]:
        """Start count restores in parallel of a snapshot, or of the first of several that fits
        this host (choose; with a snapshot remote, a snapshot held nowhere here is read from
        there: its record now, the snapshot itself in the replicas' tasks); returns the replicas
        (restoring)."""
        wanted = [prefixes] if isinstance(prefixes, str) else list(prefixes)
        free = self.config.slots - self.slots_used
        if count > free:
            raise Conflict(f"{count} replicas asked, {free} of {self.config.slots} slots free")
        try:
            manifest = self.choose(wanted)
            await asyncio.to_thread(self._verify, manifest)
        except NotFound:
            if self.config.snapshot_remote is None:
                raise
            manifest = await self._remote_manifest(wanted)
        # An index is free only once its replica's namespace is gone, not when it died.
        used = {r.index for r in self.replicas.values() if not r.released}
        indexes = list(itertools.islice((i for i in itertools.count() if i not in used), count))
        started = []
        for index in indexes:
            replica = Replica(
                id=f"r{next(self._ids)}-{secrets.token_hex(3)}",
                snapshot=manifest.id,
                model=manifest.model_name,
                index=index,
                port=int(manifest.isolation["port"]) if manifest.isolation else 8000,
                created=time.time(),
            )
            self.replicas[replica.id] = replica
            started.append(replica)
            task = asyncio.create_task(self._restore_task(replica, manifest))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._forget_old()
        return started

    async def _remote_manifest(self, wanted: Sequence[str]) -> Manifest:
        """The manifest of the first of wanted (full snapshot ids) that the remote has and this
        host fits, from its record (small); the snapshot itself is brought by the replicas'
        restores (_bring). NotFound / SnapshotInvalid as choose() says them."""
        reasons = []
        for snapshot_id in wanted:
            if lazy := self.mounted.get(snapshot_id):
                manifest = lazy.manifest
            else:
                record = await asyncio.to_thread(self._remote().record, snapshot_id)
                if record is None:
                    reasons.append(f"no snapshot {snapshot_id} here or on the remote")
                    continue
                manifest, self._records[snapshot_id] = record.manifest, record
            if (why := self.unfit(manifest)) is None and manifest.isolation:
                return manifest
            reasons.append(
                f"snapshot {snapshot_id} does not fit this host: {why or 'not isolated'}"
            )
        raise NotFound("; ".join(reasons))

    def _remote(self) -> Any:
        if self.remote is None:
            # The image store's numpy and zstd load only on an agent with a remote.
            from fastboot.imagefs.lazy_snapshots import RemoteSnapshots
            from fastboot.imagefs.store import ImageStore

            assert self.config.snapshot_remote is not None
            self.remote = RemoteSnapshots(
                self.config.snapshot_remote,
                ImageStore(envs.image_store()),
                self.config.store,
                envs.snapshot_fetch(),
            )
        return self.remote

    async def _bring(self, manifest: Manifest) -> sequence.LazySnapshot | None:
        """The remote snapshot of manifest, fetched or mounted here once however many replicas
        wait for it; None when it is a local snapshot (held from the start, or fetched)."""
        snapshot_id = manifest.id
        if lazy := self.mounted.get(snapshot_id):
            return lazy
        if snapshot_id not in self._records:
            return None
        task = self._bringing.get(snapshot_id)
        first = task is None
        if task is None:
            record = self._records[snapshot_id]
            task = asyncio.ensure_future(asyncio.to_thread(self._remote().bring, record))
            self._bringing[snapshot_id] = task
        try:
            brought: sequence.LazySnapshot = await asyncio.shield(task)
        finally:
            if task.done() and self._bringing.get(snapshot_id) is task:
                del self._bringing[snapshot_id]
        if brought.mounted:
            self.mounted[snapshot_id] = brought
        else:
            self._records.pop(snapshot_id, None)  # local from now on
        if not first:
            return brought
        logger.info(
            "%s snapshot %s from %s in %.2f s",
            "mounted" if brought.mounted else "fetched",
            snapshot_id[:12],
            self.config.snapshot_remote,
            brought.seconds,
        )
        return brought

    def _verify(self, manifest: Manifest) -> None:
        try:
            sequence.verify(
                self.config.store, manifest.id, self.digests, self._host(_engine(manifest))
            )
        finally:
            self.digests.save()

    def _host(self, engine: engines.Engine) -> Fingerprint:
        """This host's fingerprint for snapshots of engine (asked once per engine and
        options: a command engine's version comes from its own version command)."""
        which = json.dumps([engine.NAME, engine.options()], sort_keys=True)
        if which not in self._hosts:
            self._hosts[which] = sequence.host_fingerprint(engine, engine.version())
        return self._hosts[which]

    async def _restore_task(self, replica: Replica, manifest: Manifest) -> None:
        try:
            lazy = await self._bring(manifest)
            await asyncio.to_thread(self._restore_blocking, replica, manifest, lazy)
        except Exception as exc:
            logger.warning("replica %s failed: %s", replica.id, exc)
            replica.state, replica.error = "failed", str(exc)
            await asyncio.to_thread(self._clean_up, replica)
        replica.changed.set()

    def _restore_blocking(
        self, replica: Replica, manifest: Manifest, lazy: sequence.LazySnapshot | None
    ) -> None:
        start = time.monotonic()
        replica.link = netns.create(
            f"{self.config.netns_prefix}{replica.index}",
            f"{self.config.link_prefix}{replica.index}",
            self.config.subnet,
            replica.index,
            self.config.routes,
        )
        replica.log = self._log(replica)

        def adopted(tree: EngineTree) -> None:
            replica.tree, replica.pid = tree, tree.root_pid
            replica.restore_s = time.monotonic() - start
            if self.config.limits.any:
                ReplicaCgroup(self.config.name, replica.id).apply(
                    self.config.limits, tree_pids(tree.root_pid)
                )

        sequence.restore(
            _engine(manifest),
            IsolatedSite(replica.link, replica.port, replica.log),
            self.config.store,
            manifest,
            self.config.state_dir / "run",
            hooks_module=manifest.hooks,
            timeout_s=self.config.ready_timeout_s,
            adopted=adopted,
            mounted=lazy.path if lazy is not None and lazy.mounted else None,
        )
        replica.ready_s = time.monotonic() - start
        replica.state = "ready"
        if lazy is not None:
            # mounted: the rest local, so replicas stop needing the remote; fetched: digests
            lazy.fetch_rest()
        logger.info(
            "replica %s of %s ready at %s in %.2f s (criu restore %.2f s)",
            replica.id,
            manifest.id[:12],
            replica.address,
            replica.ready_s,
            replica.restore_s,
        )

    def _log(self, replica: Replica) -> BinaryIO:
        path = self.config.state_dir / "logs" / f"{replica.id}.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return os.fdopen(fd, "ab", buffering=0)

    async def stop(self, replica_id: str) -> Replica:
        replica = self.get(replica_id)
        if replica.state in LIVE_STATES:
            replica.state = "stopping"
            await asyncio.to_thread(self._stop_blocking, replica)
            replica.state = "stopped"
            replica.changed.set()
        return replica

    def _stop_blocking(self, replica: Replica) -> None:
        if replica.tree is not None:
            replica.tree.stop(grace_s=5.0)
        self._clean_up(replica)

    def _clean_up(self, replica: Replica) -> None:
        """Kill what is left in the replica's namespace, then remove namespace, link, cgroup."""
        if replica.tree is not None and replica.tree.alive():
            replica.tree.stop(grace_s=0.0)
        if replica.link is not None:
            kill_namespace(replica.link.path)
            netns.delete(replica.link)
        ReplicaCgroup(self.config.name, replica.id).remove()
        if replica.log is not None:
            replica.log.close()
        replica.released = True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            for replica in list(self.replicas.values()):
                tree = replica.tree
                if replica.state == "ready" and tree is not None and not tree.alive():
                    logger.warning(
                        "replica %s died (exit %s); cleaning up", replica.id, tree.returncode
                    )
                    replica.state = "dead"
                    replica.error = f"engine exited with {tree.returncode}"
                    await asyncio.to_thread(self._clean_up, replica)
                    replica.changed.set()

    def _forget_old(self) -> None:
        finished = [r for r in self.replicas.values() if r.released]
        for replica in finished[:-KEEP_FINISHED]:
            del self.replicas[replica.id]


def _engine(manifest: Manifest) -> engines.Engine:
    """The adapter of the engine a snapshot was taken of."""
    return engines.get(
        str(manifest.key.get("engine", engines.DEFAULT)), manifest.key.get("engine_options")
    )


def processes_in(netns_path: Path) -> list[int]:
    """Host pids whose network namespace is the one at netns_path."""
    try:
        inode = os.stat(netns_path).st_ino
    except OSError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}/ns/net").st_ino == inode:
                    pids.append(int(entry))
    return pids


def kill_namespace(netns_path: Path, timeout_s: float = 10.0) -> None:
    """SIGKILL every process in the network namespace and wait until they are gone."""
    deadline = time.monotonic() + timeout_s
    while pids := processes_in(netns_path):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        if time.monotonic() > deadline:
            logger.warning("processes %s in %s would not die", pids, netns_path)
            return
        time.sleep(0.05)


def clean_leftovers(config: AgentConfig) -> list[str]:
    """Kill the processes of, and remove, every namespace, link and cgroup with this agent's
    prefixes (what a killed agent left). Returns what was removed."""
    removed = []
    for name in netns.ours(config.netns_prefix):
        kill_namespace(netns.NETNS_DIR / name)
        netns.delete_netns(name)
        removed.append(f"netns {name}")
    for name in netns.host_links(config.link_prefix):
        netns.delete_interface(name)
        removed.append(f"link {name}")
    sweep(config.name, keep=set())
    return removed
