"""Restoring a snapshot's images into a running engine tree that fastboot owns.

Two layouts, as the snapshot was taken (fastboot.host.launch):

    restore_host()      the host's network; /dev/shm files put back first (fastboot.host.shm)
    restore_isolated()  into a prepared network namespace, any number of times at once
                        (fastboot.snapshot.isolation)

Both adopt the restored tree (or kill it: restore_and_adopt) and give CUDA processes their GPU
state back. Neither checks readiness or the oracle: that is the boot sequence's (fastboot.boot).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from fastboot.host import shm
from fastboot.host.proctree import held_signals
from fastboot.host.supervisor import EngineTree
from fastboot.snapshot import criu as criu_mod
from fastboot.snapshot import isolation
from fastboot.snapshot.cuda import gpu_after_restore
from fastboot.snapshot.store import Manifest


def attempt_dir(run_dir: Path, operation: str) -> Path:
    """A fresh directory for one CRIU run's log, stats and pidfile (criu refuses to overwrite
    a pidfile, and a run may restore twice: after a failed check it cold boots and re-snapshots)."""
    return Path(tempfile.mkdtemp(prefix=f"{operation}-", dir=run_dir))


def restore_host(
    snapshot: Path, manifest: Manifest, run_dir: Path, sink: BinaryIO, from_mount: bool = False
) -> EngineTree:
    """Restore a host-layout snapshot (at path snapshot); the engine's output goes to sink.
    from_mount: a lazily mounted remote snapshot (criu.maps_pages)."""
    criu, workdir = criu_mod.find_criu(), attempt_dir(run_dir, "restore")
    with shm.criu_lock():
        placed = shm.put_back(snapshot / "shm")
        try:
            tree = restore_and_adopt(
                workdir,
                lambda fd: criu_mod.restore(
                    criu,
                    snapshot / "images",
                    workdir,
                    manifest.stdio_pipe,
                    fd,
                    from_mount=from_mount,
                ),
                manifest.stdio_pipe,
                sink,
            )
        finally:
            # CRIU consumed its link_remap files; the engine keeps the psm_* segments it needs.
            shm.remove([n for n in placed if n.startswith("link_remap.")])
    tree.shm_names = {n for n in placed if not n.startswith("link_remap.")}
    gpu_after_restore(tree, manifest)
    return tree


def restore_isolated(
    snapshot: Path,
    manifest: Manifest,
    netns: str,
    run_dir: Path,
    sink: BinaryIO,
    from_mount: bool = False,
) -> EngineTree:
    """Restore an isolated snapshot (at path snapshot) into the network namespace netns."""
    criu, workdir = criu_mod.find_criu(), attempt_dir(run_dir, "restore")
    images = snapshot / "images"
    tree = restore_and_adopt(
        workdir,
        lambda fd: isolation.restore(
            criu, images, workdir, netns, manifest.stdio_pipe, fd, from_mount
        ),
        manifest.stdio_pipe,
        sink,
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
