"""`fastboot image build | mount | umount | ls | verify | gc | push | pull | rm |
unpack-snapshot`."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fastboot import envs
from fastboot.cli.sizes import parse_size
from fastboot.errors import UsageError

if TYPE_CHECKING:
    from fastboot.imagefs.store import ImageStore


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        type=Path,
        default=None,
        help="local image store (default $FASTBOOT_IMAGE_STORE or $FASTBOOT_HOME/images)",
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    build = sub.add_parser("build", help="build an image from a directory", allow_abbrev=False)
    build.add_argument("source", type=Path, metavar="SRC", help="directory to build from")
    build.add_argument("--name", required=True, help="image name")
    build.add_argument(
        "--chunk-size", type=parse_size, default="4M", help="chunk size (default 4M)"
    )
    build.add_argument("--no-progress", action="store_true", help="no progress bar")

    mount = sub.add_parser("mount", help="mount an image read-only (lazy)", allow_abbrev=False)
    mount.add_argument("name", metavar="NAME")
    mount.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    mount.add_argument(
        "--remote", default=None, help="base URL for missing chunks (default: where it was pulled)"
    )
    mount.add_argument(
        "--metrics-port", type=int, default=0, help="serve /metrics on 127.0.0.1:PORT"
    )
    mount.add_argument(
        "--ram", type=parse_size, default="64M", help="RAM chunk cache (default 64M)"
    )
    mount.add_argument(
        "--prefetch-rate",
        type=parse_size,
        default="256M",
        help="bytes/s the profile replay may use (default 256M; 0: no cap)",
    )
    mount.add_argument("--no-prefetch", action="store_true", help="do not replay the profile")
    mount.add_argument("--no-record", action="store_true", help="do not record a prefetch profile")
    mount.add_argument(
        "--no-passthrough",
        action="store_true",
        help="serve every read from the daemon (default: big files read whole are kept on "
        "local disk and read by the kernel directly, FUSE passthrough)",
    )

    umount = sub.add_parser("umount", help="unmount and stop the daemon", allow_abbrev=False)
    umount.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    umount.add_argument("--lazy", action="store_true", help="detach even if files are in use")

    sub.add_parser("ls", help="list images and mounts")

    verify = sub.add_parser("verify", help="re-hash every local chunk of an image")
    verify.add_argument("name", metavar="NAME")

    gc = sub.add_parser("gc", help="remove what no image or mount uses; trim the SSD cache")
    gc.add_argument(
        "--cache-max",
        type=parse_size,
        default=None,
        help="trim the SSD chunk cache above this size",
    )

    push = sub.add_parser("push", help="publish an image into a remote store directory")
    push.add_argument("name", metavar="NAME")
    push.add_argument(
        "--to",
        type=Path,
        default=None,
        help="directory a static HTTP server serves as the remote (default "
        "$FASTBOOT_IMAGE_PUSH_DIR)",
    )

    pull = sub.add_parser("pull", help="make a remote image mountable here (lazily)")
    pull.add_argument("name", metavar="NAME")
    pull.add_argument("--remote", default=None, help="base URL (default $FASTBOOT_IMAGE_REMOTE)")
    pull.add_argument("--all", action="store_true", help="also fetch every chunk (offline use)")

    rm = sub.add_parser("rm", help="remove an image's name (`gc` frees its bytes)")
    rm.add_argument("name", metavar="NAME")

    unpack = sub.add_parser(
        "unpack-snapshot",
        help="copy a snapshot stored as an image into the snapshot directory, verified",
        description="Mount image NAME (built from a snapshot's directory), check every file "
        "against the snapshot's manifest while copying it, and publish the snapshot where "
        "`fastboot serve` looks for it.",
        allow_abbrev=False,
    )
    unpack.add_argument("name", metavar="NAME")
    unpack.add_argument(
        "--remote", default=None, help="pull NAME from this base URL first (lazily)"
    )
    unpack.add_argument(
        "--snapshot-dir",
        type=Path,
        default=None,
        help="snapshot directory (default $FASTBOOT_HOME/snapshots)",
    )


def run(args: argparse.Namespace) -> int:
    # numpy (the store reads indexes): `fastboot image --help` and usage errors never load it
    from fastboot.imagefs.store import ImageStore

    store = ImageStore(args.store or envs.image_store())
    return _ACTIONS[args.action](store, args)


def _build(store: ImageStore, args: argparse.Namespace) -> int:
    # numpy, like the store: loaded by run, never by `fastboot image --help`
    from fastboot.imagefs.build import build

    started = time.monotonic()
    ref = build(
        store,
        args.source,
        args.name,
        chunk_size=args.chunk_size,
        progress=False if args.no_progress else None,
    )
    print(
        f"built {ref.name} ({ref.index[:12]}): {ref.files} files, "
        f"{ref.total_bytes / 1e6:.1f} MB, {ref.stored_bytes / 1e6:.1f} MB distinct, "
        f"in {time.monotonic() - started:.1f} s"
    )
    return 0


def _mount(store: ImageStore, args: argparse.Namespace) -> int:
    # numpy, like the store: loaded by run, never by `fastboot image --help`
    from fastboot.imagefs.mount import MountOptions, mount

    record = mount(
        args.name,
        args.mountpoint,
        store,
        MountOptions(
            remote=args.remote,
            metrics_port=args.metrics_port,
            ram_bytes=args.ram,
            prefetch=not args.no_prefetch,
            prefetch_rate=args.prefetch_rate,
            record=not args.no_record,
            passthrough=not args.no_passthrough,
        ),
    )
    print(
        f"mounted {record.name} on {record.mountpoint} (daemon pid {record.pid}, log {record.log})"
    )
    return 0


def _umount(store: ImageStore, args: argparse.Namespace) -> int:
    # numpy, like the store: loaded by run, never by `fastboot image --help`
    from fastboot.imagefs.mount import umount

    umount(args.mountpoint, store, lazy=args.lazy)
    print(f"unmounted {args.mountpoint}")
    return 0


def _ls(store: ImageStore, args: argparse.Namespace) -> int:
    store.ensure()
    for ref in store.list_refs():
        origin = f"  remote {ref.remote}" if ref.remote else ""
        print(
            f"{ref.name:24} {ref.index[:12]}  {ref.files:7d} files  "
            f"{ref.total_bytes / 1e9:7.2f} GB{origin}"
        )
    for m in store.mounts():
        print(f"mounted {m.name} on {m.mountpoint} (pid {m.pid}, metrics {m.metrics_file})")
    return 0


def _verify(store: ImageStore, args: argparse.Namespace) -> int:
    # trio and prometheus_client (sync -> prefetch, tiers, metrics): only verify and pull
    from fastboot.imagefs.sync import verify

    checked = verify(store, args.name)
    print(
        f"{args.name}: {checked.verified} of {checked.chunks} chunks verified "
        f"({checked.bytes / 1e6:.1f} MB), {checked.corrupt} corrupt, "
        f"{checked.not_local} only on the remote"
    )
    return 1 if checked.corrupt else 0


def _gc(store: ImageStore, args: argparse.Namespace) -> int:
    removed = store.gc(cache_high=args.cache_max)
    print(" ".join(f"{k}={v}" for k, v in removed.items()))
    return 0


def _push(store: ImageStore, args: argparse.Namespace) -> int:
    dest = args.to or (Path(d) if (d := envs.image_push_dir()) else None)
    if dest is None:
        raise UsageError("push needs a destination: --to DIR (or FASTBOOT_IMAGE_PUSH_DIR)")
    copied = store.push(args.name, dest)
    print(
        f"pushed {args.name} to {dest}: {copied['packs']} new packs, {copied['bytes'] / 1e6:.1f} MB"
    )
    return 0


def _pull(store: ImageStore, args: argparse.Namespace) -> int:
    # trio and prometheus_client (sync -> prefetch, tiers, metrics): only verify and pull
    from fastboot.imagefs.sync import pull

    remote = args.remote or envs.image_remote()
    if remote is None:
        raise UsageError("pull needs a remote: --remote URL (or FASTBOOT_IMAGE_REMOTE)")
    ref = pull(store, args.name, remote, everything=args.all)
    print(
        f"pulled {ref.name} ({ref.index[:12]}) from {remote}"
        + (" with every chunk" if args.all else " (chunks are fetched on use)")
    )
    return 0


def _unpack_snapshot(store: ImageStore, args: argparse.Namespace) -> int:
    # trio and prometheus_client (snapshots -> sync): only this action
    from fastboot.imagefs.snapshots import unpack_snapshot

    done = unpack_snapshot(args.name, args.snapshot_dir, store, remote=args.remote)
    what = f"{done.bytes / 1e9:.2f} GB in {done.seconds:.1f} s" if done.bytes else "already"
    print(f"snapshot {done.manifest.id} in {done.path.parent} ({what})")
    return 0


def _rm(store: ImageStore, args: argparse.Namespace) -> int:
    store.remove_ref(args.name)
    print(f"removed {args.name} (run `fastboot image gc` to free its bytes)")
    return 0


_ACTIONS: dict[str, Callable[[ImageStore, argparse.Namespace], int]] = {
    "build": _build,
    "mount": _mount,
    "umount": _umount,
    "ls": _ls,
    "verify": _verify,
    "gc": _gc,
    "push": _push,
    "pull": _pull,
    "unpack-snapshot": _unpack_snapshot,
    "rm": _rm,
}
