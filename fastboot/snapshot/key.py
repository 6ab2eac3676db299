"""The snapshot key: what a snapshot is a snapshot of, over plain values, and its id.

Every path that makes or finds a snapshot (`fastboot serve` in either layout, `fastboot snapshot
create`, the agent) builds the key here, so the same flags, model and environment name the same
snapshot wherever they come from. The host fingerprint is not part of it: it is checked
separately, so a snapshot that does not fit this host is reported, not silently missed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastboot import __version__
from fastboot.snapshot import cpu_levels
from fastboot.snapshot.digests import DigestCache, file_digest
from fastboot.snapshot.store import SnapshotId


def model_identity(
    model: str, cache: DigestCache | None = None, named: list[str] | None = None
) -> dict[str, Any]:
    """A local model by the digest of its files (remembered in cache while they are
    unchanged); a hub name as given. named: more paths the engine's flags name
    (Engine.key_paths), keyed by content under "files" (absent when there are none, so the
    ids of snapshots that name none stay as they were)."""
    identity = _path_identity(model, cache)
    if named:
        identity["files"] = {path: _path_identity(path, cache) for path in named}
    return identity


def _path_identity(model: str, cache: DigestCache | None) -> dict[str, Any]:
    path = Path(model)
    if path.is_file() and model not in ("", "."):
        content = cache.digest(path) if cache else file_digest(path)
        return {"path": str(path.resolve()), "content": content}
    if not path.is_dir() or model == "":
        return {"name": model}
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path)}\0{file.stat().st_size}\0".encode())
        digest.update((cache.digest(file) if cache else file_digest(file)).encode())
    return {"path": str(path.resolve()), "content": digest.hexdigest()}


def snapshot_key(
    *,
    engine: str,
    engine_version: str,
    argv: list[str],
    model: dict[str, Any],
    env_prefixes: tuple[str, ...],
    environment: dict[str, Any] | None = None,
    layout: str | None = None,
    engine_options: dict[str, Any] | None = None,
    cpu_baseline: str = cpu_levels.NATIVE,
    environ: Mapping[str, str] = os.environ,
) -> tuple[SnapshotId, dict[str, Any]]:
    """The snapshot's id and the key parts it is the digest of.

    argv: the engine's flags as it runs them; model: model_identity() or an image's identity;
    env_prefixes: the adapter's (variables of environ with them are keyed); environment: the
    env image the engine runs from; layout: None (host) or "isolated"; engine_options: what
    builds the adapter again (Engine.options); cpu_baseline: the level the engine's code is
    held to. The last four appear in the key only when set (not native), so snapshots made
    without them keep their ids."""
    key: dict[str, Any] = {
        "engine": engine,
        "engine_version": engine_version,
        "argv": argv,
        "model": model,
        "fastboot": __version__,
        "env": {k: v for k, v in sorted(environ.items()) if k.startswith(env_prefixes)},
    }
    if environment is not None:
        key["environment"] = environment
    if layout is not None:
        key["layout"] = layout
    if engine_options:
        key["engine_options"] = engine_options
    if cpu_baseline != cpu_levels.NATIVE:
        key["cpu_baseline"] = cpu_baseline
    return key_id(key), key


def key_id(key: dict[str, Any]) -> SnapshotId:
    return SnapshotId(hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24])
