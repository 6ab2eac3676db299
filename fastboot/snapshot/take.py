"""Taking a snapshot of a ready, warmed, quiesced engine tree: dump, then publish atomically.

The dump kills the tree. What comes before it (warm-up, the oracle, quiesce) is the boot
sequence's (fastboot.boot.sequence), which also decides what happens when this fails: CRIU
resumes a tree whose dump failed, so the engine can still be served.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastboot.host import shm
from fastboot.host.proctree import tree_pids
from fastboot.host.supervisor import EngineTree
from fastboot.snapshot import cpu_levels, isolation
from fastboot.snapshot import criu as criu_mod
from fastboot.snapshot.cuda import with_gpu
from fastboot.snapshot.digests import DigestCache
from fastboot.snapshot.fingerprint import Fingerprint
from fastboot.snapshot.restore import attempt_dir
from fastboot.snapshot.store import Manifest, SnapshotId, Store


@dataclass(frozen=True)
class Target:
    """Where a new snapshot goes and what it is a snapshot of."""

    store: Store
    snapshot_id: SnapshotId
    key: dict[str, Any]
    """The key parts the id is the digest of (fastboot.snapshot.key)."""
    host: Fingerprint
    engine_argv: list[str]
    digests: DigestCache
    hooks: str | None = None
    """Module with quiesce/resume hooks, recorded so every restore resumes with them."""
    isolation: dict[str, Any] | None = None
    """Set for an isolated engine (see Manifest.isolation)."""
    cpu_baseline: str = cpu_levels.NATIVE
    """The level the engine's code is held to: the manifest records its flags, not the host's
    (fastboot.snapshot.cpu_levels.ceiling_flags)."""

    @property
    def recorded(self) -> Fingerprint:
        """The fingerprint the manifest records: the host's, CPU flags held to the baseline."""
        flags = cpu_levels.ceiling_flags(self.cpu_baseline, self.host.cpu_flags)
        return dataclasses.replace(self.host, cpu_flags=flags)


@dataclass(frozen=True)
class Taken:
    """What the engine was before its dump, for the manifest."""

    model: str
    """The model name it serves."""
    oracle: dict[str, Any]
    cold_boot_s: float


def dump_and_publish(tree: EngineTree, target: Target, taken: Taken, run_dir: Path) -> Manifest:
    """Dump the tree (it dies) and publish the snapshot; nothing is published on failure."""
    criu = criu_mod.find_criu()
    with target.store.partial(target.snapshot_id) as partial:
        dump_s = _dump(criu, tree, partial, run_dir)
        return target.store.publish(
            partial,
            Manifest(
                id=target.snapshot_id,
                key=target.key,
                fingerprint=target.recorded,
                oracle=taken.oracle,
                created=time.time(),
                cold_boot_s=taken.cold_boot_s,
                dump_s=dump_s,
                engine_argv=target.engine_argv,
                stdio_pipe=tree.stdio_pipe,
                model_name=taken.model,
                isolation=target.isolation,
                hooks=target.hooks,
            ),
            target.digests,
        )


def _dump(criu: criu_mod.Criu, tree: EngineTree, partial: Path, run_dir: Path) -> float:
    """Dump the tree into partial and save the /dev/shm files it needs; returns seconds.
    Processes holding CUDA contexts are locked and checkpointed first (fastboot.snapshot.cuda)."""
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
