"""`fastboot snapshot create MODEL [vllm serve flags] | ls | inspect ID | verify ID | rm ID |
push ID --to DIR`.

`create` takes `fastboot serve`'s engine flags (fastboot.cli.engine_choice): a command engine's
snapshot is made the same way, `fastboot snapshot create --fastboot-engine command -- SERVER ...`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fastboot import engines, envs
from fastboot.boot.create import DEFAULT_CREATE_BASELINE, CreateConfig, create_snapshot
from fastboot.cli import engine_choice
from fastboot.cli.engine_argv import FlagSpec
from fastboot.errors import UsageError
from fastboot.snapshot.store import Manifest, SnapshotInvalid, Store

#: What follows `create` is its command line, verbatim (fastboot.cli.main).
PASSTHROUGH_AFTER = "create"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="snapshot directory (default $FASTBOOT_HOME/snapshots)",
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = sub.add_parser(
        "create",
        help="snapshot MODEL in its own namespaces, for agents to restore as many replicas",
        usage=(
            "fastboot snapshot create MODEL [vllm serve flags] [--fastboot-hooks MODULE]\n"
            "       fastboot snapshot create [MODEL] --fastboot-engine command "
            "[--fastboot-...] -- SERVER ARG..."
        ),
        description=(
            "Cold boot `vllm serve MODEL [flags]` in its own network, mount and pid "
            "namespaces (listening on 0.0.0.0:--port inside, default 8000), warm it up, record "
            "its oracle, dump it, prove the snapshot restores, and print its id."
        ),
    )
    create.add_argument("argv", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    sub.add_parser("ls", help="list snapshots")
    for name, text in (
        ("inspect", "show everything about one snapshot"),
        ("verify", "check every file against the manifest's digests"),
        ("rm", "remove a snapshot"),
    ):
        action = sub.add_parser(name, help=text)
        action.add_argument("id", help="snapshot id or a unique prefix of it")
    push = sub.add_parser(
        "push",
        help="publish a snapshot into a remote image store directory, for hosts that lack it "
        "to restore lazily (`fastboot serve --fastboot-snapshot-remote URL`)",
    )
    push.add_argument("id", help="snapshot id or a unique prefix of it")
    push.add_argument(
        "--to",
        type=Path,
        default=None,
        help="the directory a static HTTP server serves (default $FASTBOOT_IMAGE_PUSH_DIR)",
    )
    push.add_argument("--store", type=Path, default=None, help="local image store")


def _row(m: Manifest) -> str:
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.created))
    model = m.key["model"].get("path") or m.key["model"].get("name")
    engine = f"{m.key['engine']} {m.key['engine_version']}"
    size = f"{m.total_bytes / 1e9:6.2f} GB"
    return f"{m.id[:12]}  {created}  {size}  cold {m.cold_boot_s:5.1f} s  {engine}  {model}"


CREATE_FLAGS = [
    *engine_choice.FLAGS,
    FlagSpec(
        "hooks", "module with quiesce(url)/resume(url) run around the dump/after restore", True
    ),
]


def _create(store: Store, argv: list[str]) -> int:
    split, engine = engine_choice.choose_engine(argv, CREATE_FLAGS)
    if engine.host not in (None, "0.0.0.0"):
        raise UsageError(
            "an isolated engine listens on 0.0.0.0 inside its own network namespace; drop --host"
        )
    if engine.name not in engines.ISOLATED:
        raise UsageError(
            f"`fastboot snapshot create` runs {' and '.join(engines.ISOLATED)}, not {engine.name}"
        )
    config = CreateConfig(
        model=engine.model,
        engine_argv=list(engine.engine_argv),
        store=store,
        port=engine.port or 8000,
        hooks=str(split.fastboot["hooks"]) if "hooks" in split.fastboot else None,
        engine=engine.name,
        engine_options=engine.options,
        cpu_baseline=str(split.fastboot.get("cpu-baseline", DEFAULT_CREATE_BASELINE)),
    )
    manifest = create_snapshot(config)
    print(manifest.id)
    return 0


def run(args: argparse.Namespace) -> int:
    store = Store(args.dir or envs.snapshot_dir())
    if args.action == "create":
        return _create(store, args.argv)
    if args.action == "ls":
        for item in store.list():
            print(_row(item) if isinstance(item, Manifest) else f"INVALID  {item}")
        return 0
    snapshot_id = store.resolve(args.id)
    if args.action == "inspect":
        manifest = store.read_manifest(snapshot_id)
        document = manifest.to_json()
        document["total_bytes"] = manifest.total_bytes
        print(json.dumps(document, indent=2, sort_keys=True))
    elif args.action == "verify":
        try:
            manifest = store.verify(snapshot_id)
        except SnapshotInvalid as exc:
            print(f"INVALID {exc}")
            return 1
        print(f"ok {snapshot_id}: {len(manifest.files)} files, {manifest.total_bytes} bytes")
    elif args.action == "push":
        return _push(store, snapshot_id, args)
    elif args.action == "rm":
        store.remove(snapshot_id)
        print(f"removed {snapshot_id}")
    return 0


def _push(store: Store, snapshot_id: str, args: argparse.Namespace) -> int:
    # The image store pulls in numpy and zstd (the [imagefs] extra): only push pays for them.
    from fastboot.imagefs.lazy_snapshots import push
    from fastboot.imagefs.store import ImageStore

    dest = args.to or envs.image_push_dir()
    if dest is None:
        raise UsageError("say where to publish: --to DIR (or set FASTBOOT_IMAGE_PUSH_DIR)")
    images = ImageStore(args.store or envs.image_store())
    pushed = push(store, snapshot_id, images, Path(dest))
    print(
        f"pushed {snapshot_id} to {dest}: {pushed.image_bytes / 1e9:.2f} GB of files, "
        f"{pushed.stored_bytes / 1e9:.2f} GB stored, {pushed.new_stored_bytes / 1e9:.2f} GB "
        f"new in {images.root} (the rest shared with images already there), index "
        f"{pushed.index[:16]}"
    )
    return 0
