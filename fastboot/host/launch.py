"""How an engine process starts so that CRIU can dump it and restore it many times.

Two layouts (fastboot.host.supervisor spawns both; docs/snapshots.md and
fastboot.snapshot.isolation say why each piece is there):

    host layout      unshare --pid --fork -- <iouring wrapper> ENGINE...
                     pid 1 of a new pid namespace, on the host's network and mounts
    isolated layout  nsenter --net=NETNS unshare --mount --pid --fork --
                       sh -c ENGINE_SH <iouring wrapper> ENGINE...
                     also in a network namespace fastboot made and a mount namespace of its own

What the isolated layout's sh does before it execs the engine: mounts that only this host has at
this moment would become external mounts a restore elsewhere cannot find, so everything but
KEPT_MOUNTS is unmounted; a /proc of the new pid namespace and a private tmpfs on /dev/shm are
mounted; stdin is reopened inside the mount namespace (an fd on another namespace's mount fails
the dump).
"""

from __future__ import annotations

from fastboot.host import iouring
from fastboot.host.netns import NETNS_DIR

#: Mounts an isolated engine keeps from the host (every host has them; see the module doc).
KEPT_MOUNTS = ("/", "/sys", "/dev", "/dev/pts")
#: pid 1 of the new namespaces runs this, then execs its arguments.
ENGINE_SH = f"""
for round in 1 2 3; do
  for m in $(awk '{{print $5}}' /proc/self/mountinfo | sort -r -u); do
    case "$m" in {"|".join(KEPT_MOUNTS)}) ;; *) umount -l "$m" 2>/dev/null ;; esac
  done
done
mount -t proc proc /proc && mount -t tmpfs -o mode=1777 tmpfs /dev/shm && exec "$@" </dev/null
"""


def engine_wrapper(netns: str) -> list[str]:
    """The command prefix that starts an engine as pid 1 of new pid and mount namespaces inside
    the network namespace netns (follow it with the iouring wrapper and the engine's argv)."""
    return [
        "nsenter",
        f"--net={NETNS_DIR / netns}",
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--fork",
        "--",
        "sh",
        "-c",
        ENGINE_SH,
        "sh",
    ]


def command(argv: list[str], netns: str | None) -> list[str]:
    """The full command line that starts argv as pid 1 of a new pid namespace with io_uring
    blocked: on the host's network (netns None) or isolated in netns (see the module doc)."""
    if netns is None:
        return ["unshare", "--pid", "--fork", "--", *iouring.wrap(argv, setsid=True)]
    return [*engine_wrapper(netns), *iouring.wrap(argv, setsid=True)]
