"""`fastboot snapshot ls | inspect ID | verify ID | rm ID`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fastboot import envs
from fastboot.snapshot.store import Manifest, SnapshotInvalid, Store


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="snapshot directory (default $FASTBOOT_HOME/snapshots)",
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("ls", help="list snapshots")
    for name, text in (
        ("inspect", "show everything about one snapshot"),
        ("verify", "check every file against the manifest's digests"),
        ("rm", "remove a snapshot"),
    ):
        action = sub.add_parser(name, help=text)
        action.add_argument("id", help="snapshot id or a unique prefix of it")


def _row(m: Manifest) -> str:
    created = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.created))
    model = m.key["model"].get("path") or m.key["model"].get("name")
    engine = f"{m.key['engine']} {m.key['engine_version']}"
    size = f"{m.total_bytes / 1e9:6.2f} GB"
    return f"{m.id[:12]}  {created}  {size}  cold {m.cold_boot_s:5.1f} s  {engine}  {model}"


def run(args: argparse.Namespace) -> int:
    store = Store(args.dir or envs.home() / "snapshots")
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
    elif args.action == "rm":
        store.remove(snapshot_id)
        print(f"removed {snapshot_id}")
    return 0
