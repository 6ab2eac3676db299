"""The mount daemon: one process per mount, trio + pyfuse3 (`python -m fastboot.imagefs.daemon`).

Started by `fastboot.imagefs.mount.mount` with a JSON `DaemonConfig` (imagefs/config.py) as its
only argument, its stdout/stderr on the mount's log file, and a pipe fd on which it writes
b"ready" once the filesystem is mounted. It runs until the mountpoint is unmounted (`fastboot
image umount`) or it gets SIGTERM/SIGINT (then it unmounts itself). On the way out it saves the
prefetch profile and the final metrics. Killed with SIGKILL, the kernel fails every access to the
mountpoint with ENOTCONN until something unmounts it; `fastboot image mount` does that before
mounting again. Only the daemon process imports this module (it imports trio and pyfuse3).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyfuse3
import trio
from prometheus_client import disable_created_metrics, start_http_server

from fastboot import logs
from fastboot.errors import FastbootError
from fastboot.imagefs import passthrough, prefetch
from fastboot.imagefs.config import DaemonConfig
from fastboot.imagefs.fs import ImageOperations
from fastboot.imagefs.index import ChunkRef, ImageIndex
from fastboot.imagefs.metrics import Metrics
from fastboot.imagefs.remote import RemoteClient
from fastboot.imagefs.store import ImageStore
from fastboot.imagefs.tiers import Blob, Tiers

logger = logging.getLogger("fastboot.imagefs.daemon")


def _set_read_ahead(mountpoint: str, kb: int) -> None:
    # The bdi is named by the mount's device number; stat(2) of the mountpoint would ask this
    # very daemon (deadlock before the loop runs), so take it from mountinfo.
    if kb <= 0:
        return
    device = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4] == mountpoint:
                device = fields[2]
    if device is None:
        logger.debug(
            "%s is not in /proc/self/mountinfo; keeping the kernel's readahead", mountpoint
        )
        return
    path = Path(f"/sys/class/bdi/{device}/read_ahead_kb")
    try:
        path.write_text(str(kb))
    except OSError as exc:
        logger.debug("could not raise %s to %d: %s", path, kb, exc)


def run(config: DaemonConfig) -> int:
    started = time.monotonic()
    store = ImageStore(Path(config.store))
    index = store.load_index(config.index)
    metrics = _metrics(config, index)
    remote = RemoteClient(config.remote) if config.remote else None
    tiers = Tiers(store, remote, metrics, ram_bytes=config.ram_bytes, threads=config.threads)
    recorder = prefetch.Recorder() if config.record else None
    profile = (
        prefetch.load_profile(store.profile_path(config.index), index) if config.prefetch else None
    )
    if recorder is not None and profile is not None:
        # Reads that the replay's pages answer never reach the daemon, so a profile recorded
        # from scratch would lose them (it shrank from 176 MB to 38 MB in one mount): start
        # from the replayed one and add what this mount's readers touch besides.
        for entry, chunk in profile.tolist():
            recorder.note(entry, chunk)
        recorder.saved = len(recorder)
    through = _passthrough(config, store, index, tiers, metrics)
    ops = ImageOperations(index, tiers, metrics, recorder, config.readahead_chunks, through)
    pyfuse3.init(ops, config.mountpoint, _fuse_options(config))
    terminated = False

    def save() -> None:
        if recorder is not None and recorder.save(store, config.index):
            logger.debug("saved a prefetch profile of %d chunks", len(recorder))
        metrics.write_textfile(Path(config.metrics_file))

    async def main() -> None:
        nonlocal terminated
        async with trio.open_nursery() as nursery:
            tiers.nursery = nursery

            async def on_signals() -> None:
                nonlocal terminated
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        logger.info("got signal %d; unmounting %s", signum, config.mountpoint)
                        terminated = True
                        pyfuse3.terminate()
                        return

            async def every_second() -> None:
                while True:
                    await trio.sleep(1.0)
                    await trio.to_thread.run_sync(save)

            async def replay() -> None:
                if profile is not None:
                    pages = PageCache(config.mountpoint, index)
                    await _replay(profile, index, tiers, through, config.prefetch_rate, pages)
                    logger.info("prefetch put %.1f MB into the page cache", pages.stored / 1e6)

            async def ready() -> None:
                # A stat from another thread makes the kernel send INIT (which resets the bdi's
                # readahead) and one request, so this proves the mount serves before "ready".
                await trio.to_thread.run_sync(os.stat, config.mountpoint)
                _set_read_ahead(config.mountpoint, config.read_ahead_kb)
                await trio.to_thread.run_sync(save)
                if config.ready_fd >= 0:
                    os.write(config.ready_fd, b"ready")
                    os.close(config.ready_fd)
                logger.info(
                    "mounted image %s (%d entries, %.1f MB) on %s in %.2f s; remote %s",
                    config.name,
                    len(index),
                    index.total_bytes / 1e6,
                    config.mountpoint,
                    time.monotonic() - started,
                    config.remote or "none",
                )
                await replay()

            nursery.start_soon(on_signals)
            nursery.start_soon(every_second)
            nursery.start_soon(ready)
            await pyfuse3.main()
            if through is not None:
                await through.drain()
            await tiers.drain()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=terminated)
        save()
        if remote is not None:
            remote.close()
    logger.info("unmounted %s after %.0f s", config.mountpoint, time.monotonic() - started)
    return 0


def _metrics(config: DaemonConfig, index: ImageIndex) -> Metrics:
    """This daemon's metrics, with the image's sizes set; served on `metrics_port` if set."""
    disable_created_metrics()  # type: ignore[no-untyped-call]
    metrics = Metrics()
    metrics.image_bytes.set(index.total_bytes)
    metrics.stored_bytes.set(index.stored_bytes)
    if config.metrics_port:
        start_http_server(config.metrics_port, addr="127.0.0.1", registry=metrics.registry)
    return metrics


def _passthrough(
    config: DaemonConfig, store: ImageStore, index: ImageIndex, tiers: Tiers, metrics: Metrics
) -> passthrough.Passthrough | None:
    """The mount's passthrough, or None where it is off, not worth it for this image, or not
    possible here (a pyfuse3 without the patch; not root, so no CAP_SYS_ADMIN)."""
    wanted = config.passthrough and passthrough.worth_it(index)
    if not (wanted and passthrough.supported() and os.geteuid() == 0):
        return None
    return passthrough.Passthrough(store, index, tiers, metrics, mountpoint=config.mountpoint)


def _fuse_options(config: DaemonConfig) -> set[str]:
    """pyfuse3's mount options: read-only, named after the image; other users may read it
    only when root mounts it (allow_other needs user_allow_other in fuse.conf otherwise)."""
    options = set(pyfuse3.default_options)
    options |= {f"fsname=fastboot:{config.name}", "subtype=fastboot", "ro"}
    if config.allow_other and os.geteuid() == 0:
        options.add("allow_other")
    return options


class PageCache:
    """Prefetched chunks put into the kernel's page cache of this mount (FUSE_NOTIFY_STORE), so
    a profiled file's first reads never reach the daemon.

    The kernel stores pages only for an inode it already knows (ENOENT otherwise), so each file
    is first looked up with a stat through the mount from the prefetch's worker thread (this
    daemon's own loop answers it); its dentry then stays cached for the reader too. Measured
    with `import torch` from a remote env image (benchmarks/imagefs_bench.py): with the profile
    replayed into the SSD cache only, a cold import was no faster (3.6-3.7 s, against 3.8 s
    without it; py-spy showed the daemon's loop idle 83% of the time: the import waited on one
    FUSE round trip and one SSD-cache read per file in turn)."""

    def __init__(self, mountpoint: str, index: ImageIndex) -> None:
        self.mountpoint = mountpoint
        self.index = index
        self.known: set[int] = set()
        self.stored = 0
        self.off = False

    def put(self, entry: int, chunk: int, data: Blob) -> None:
        """Store a chunk's bytes as pages of entry (blocking; never raises)."""
        if self.off:
            return
        if entry not in self.known:
            try:
                os.stat(os.path.join(self.mountpoint, self.index.path(entry).lstrip("/")))
            except OSError:
                return
            self.known.add(entry)
        try:
            offset = self.index.chunk_offset(entry, chunk)
            pyfuse3.notify_store(entry + 1, offset, data)  # type: ignore[arg-type]  # any buffer
            self.stored += len(data)
        except OSError as exc:
            if exc.errno == errno.ENOSYS:
                self.off = True
                logger.info("this kernel does not take FUSE_NOTIFY_STORE; prefetch caches on SSD")
            else:
                logger.debug("notify_store of entry %d: %s", entry, exc)


async def _replay(
    rows: np.ndarray[Any, Any],
    index: ImageIndex,
    tiers: Tiers,
    through: passthrough.Passthrough | None,
    rate: int,
    pages: PageCache,
) -> None:
    """Replay the prefetch profile, less the files kept whole (read from local disk: nothing of
    them to fetch), into the SSD cache and the page cache."""
    if through is not None:
        kept = await trio.to_thread.run_sync(through.kept_entries)
        rows = rows[~np.isin(rows["entry"], kept)]
    if len(rows):
        unwritten: list[tuple[ChunkRef, Blob]] = []
        await prefetch.replay(index, rows, tiers, rate, put=pages.put, unwritten=unwritten)
        # now the SSD cache, for the next mount on this host (the page cache has them now)
        trio.lowlevel.spawn_system_task(_write_cache, tiers, unwritten)


async def _write_cache(tiers: Tiers, chunks: list[tuple[ChunkRef, Blob]]) -> None:
    def write() -> None:
        for ref, data in chunks:
            tiers.keep(ref, data)

    await trio.to_thread.run_sync(write)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fastboot.imagefs.daemon CONFIG_JSON", file=sys.stderr)
        return 2
    config = DaemonConfig.from_json(args[0])
    logs.configure(config.log_level)
    try:
        return run(config)
    except FastbootError as exc:
        logger.error("%s", exc)
        return 1
    except Exception:
        logger.exception("the image daemon failed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
