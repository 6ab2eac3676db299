"""Engines in their own network, mount and pid namespaces, so one snapshot restores many times
at once on one host (and on others) without the copies sharing anything.

An isolated cold boot (to take a snapshot from):

    fastboot
      └─ nsenter --net=/run/netns/NETNS           a namespace fastboot made (fastboot.host.netns)
           └─ unshare --mount --propagation private --pid --fork
                └─ [pid 1] sh (fastboot.host.launch.ENGINE_SH): drop host-specific mounts,
                     mount a /proc of this pid namespace and a private tmpfs on /dev/shm,
                     reopen stdin, then exec
                     python -m fastboot.host.iouring --setsid -- vllm serve ...

A restore of it, any number of times at once:

    criu restore --root / --external mnt[] --inherit-fd fd[N]:fastboot-net
                 N = a fresh network namespace with its own veth and address

What makes this work (measured here with criu 4.2.1, kernel 6.18; docs/replicas.md):

- The network namespace is external (`--external net[INODE]:KEY` at dump): CRIU saves the
  sockets, not the namespace, and each restore is handed a fresh one (`--inherit-fd fd[N]:KEY`).
  The engine still listens on the port it was dumped with, at the new namespace's address.
- The mount namespace is dumped: CRIU saves the private tmpfs on /dev/shm with its content
  (vLLM's psm_* queues and semaphores, CRIU's own link_remap files) and recreates /proc. Every
  other mount is the host's (`--external mnt[]` matches them to the host's mounts by device and
  root; `--root /` makes the host's / the new namespace's root). So each replica has its own
  /dev/shm — no queue or semaphore is shared, no host-wide lock is needed around restores — and
  a /proc of its own pid namespace: vLLM reads /proc/<os.getpid()>/status, which on the host's
  /proc names some other process or none ("No such file or directory: '/proc/32/status'").
- Mounts that only this host has at this moment (other namespaces' /run/netns entries, FUSE test
  mounts, ...) would become external mounts that a restore elsewhere cannot find, and an nsfs
  mount copied into the namespace keeps that network namespace alive. launch.ENGINE_SH therefore
  unmounts everything but /, /sys, /dev and /dev/pts before the engine starts; a host that
  restores the snapshot needs those four, which every Linux host has.
- Every file the engine holds must be opened inside its mount namespace: an fd on a mount of
  another namespace fails the dump ("Can't lookup mount=24 for fd=0 path=/dev/null"), which is why
  the sh reopens stdin; stdout/stderr are a pipe, re-attached with --inherit-fd.
- The network lock: the dump locks its own throw-away namespace with iptables; a restore's
  namespace is new and was never locked, so CRIU's unlock there logs an iptables error that is
  harmless (the restore succeeds).
"""

from __future__ import annotations

import os
from pathlib import Path

from fastboot.host.netns import NETNS_DIR
from fastboot.snapshot import criu as criu_mod

#: The name the network namespace has in CRIU's images, matched up again at restore.
NET_KEY = "fastboot-net"


def dump(criu: criu_mod.Criu, root_pid: int, images: Path, workdir: Path) -> None:
    """Dump the isolated tree at root_pid (the dump kills it), its mount namespace included."""
    net_inode = os.stat(f"/proc/{root_pid}/ns/net").st_ino
    criu_mod.dump(
        criu,
        root_pid,
        images,
        workdir,
        extra=("--external", f"net[{net_inode}]:{NET_KEY}", "--external", "mnt[]"),
    )


def restore(
    criu: criu_mod.Criu,
    images: Path,
    workdir: Path,
    netns: str,
    stdio_pipe: str,
    stdio_fd: int,
    from_mount: bool = False,
) -> int:
    """Restore an isolated snapshot into the prepared network namespace netns; returns the
    restored pid 1 (host pid). from_mount: see criu.maps_pages."""
    net_fd = os.open(NETNS_DIR / netns, os.O_RDONLY)
    try:
        return criu_mod.restore(
            criu,
            images,
            workdir,
            stdio_pipe,
            stdio_fd,
            extra=(
                "--root",
                "/",
                "--external",
                "mnt[]",
                "--inherit-fd",
                f"fd[{net_fd}]:{NET_KEY}",
            ),
            pass_fds=(net_fd,),
            from_mount=from_mount,
        )
    finally:
        os.close(net_fd)
