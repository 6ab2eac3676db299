"""`fastboot snapshot create`: an isolated snapshot for replicas, proven before it is kept.

The engine cold boots in a throw-away network namespace (IsolatedSite), is snapshotted there,
and the snapshot is restored once into a second namespace and checked (fastboot.boot.sequence
.create) before its id is printed. `fastboot serve --fastboot-isolated` with the same flags
finds the same snapshot (isolated_target).
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastboot import engines
from fastboot.boot import sequence
from fastboot.boot.site import INNER_PORT, IsolatedSite
from fastboot.engines import hooks
from fastboot.host import netns
from fastboot.host.supervisor import become_subreaper, stop_all
from fastboot.snapshot import cpu_levels
from fastboot.snapshot.digests import DigestCache
from fastboot.snapshot.key import model_identity, snapshot_key
from fastboot.snapshot.store import Manifest, Store
from fastboot.snapshot.take import Target

#: The CPU baseline `fastboot snapshot create` holds engines to unless told (docs/snapshots.md).
DEFAULT_CREATE_BASELINE = cpu_levels.NATIVE
#: Links of the throw-away namespaces isolated snapshots are taken in (one /30 per process).
SNAPSHOT_SUBNET = "10.212.0.0/16"


@dataclass(frozen=True)
class CreateConfig:
    """What `fastboot snapshot create` was asked to do."""

    model: str
    """MODEL as given (a local directory or a hub name)."""
    engine_argv: list[str]
    """The engine's flags, verbatim (fastboot appends --host 0.0.0.0 --port PORT)."""
    store: Store
    port: int = INNER_PORT
    """The port the engine listens on inside its namespace (every replica: the same)."""
    hooks: str | None = None
    engine: str = engines.DEFAULT
    engine_options: dict[str, Any] = field(default_factory=dict)
    """The adapter's options (fastboot.engines.get)."""
    cpu_baseline: str = DEFAULT_CREATE_BASELINE
    """The level the engine's code is held to (fastboot.snapshot.cpu_levels): a fleet's
    snapshot restores on every host at or above it."""
    ready_timeout_s: float = 900.0
    restore_timeout_s: float = sequence.RESTORE_TIMEOUT_S


def isolated_target(
    spec: sequence.BootSpec, site: IsolatedSite, store: Store, digests: DigestCache
) -> Target:
    """Where the isolated snapshot of spec goes: its key and id. The engine's --host/--port
    are fastboot's (0.0.0.0:port inside the namespace), so one snapshot serves every replica
    and `fastboot serve --fastboot-isolated` with the same flags finds the same snapshot."""
    version = spec.engine.version()
    key = snapshot_key(
        engine=spec.engine.NAME,
        engine_version=version,
        argv=spec.engine_argv,
        model=model_identity(
            spec.model, digests, spec.engine.key_paths(spec.model, spec.engine_argv)
        ),
        env_prefixes=spec.engine.ENV_PREFIXES,
        layout=site.layout,
        engine_options=spec.engine.options(),
        cpu_baseline=spec.cpu_baseline,
    )
    return sequence.new_target(
        spec, site, store, key, sequence.host_fingerprint(spec.engine, version), digests
    )


def create_snapshot(config: CreateConfig) -> Manifest:
    """Cold boot, snapshot and prove (see the module doc); the proven snapshot's manifest.
    Engine output goes to stderr (the CLI prints the id on stdout)."""
    config.store.ensure()
    hooks.load(config.hooks)
    become_subreaper()  # the proving restore's engine is reparented to us when criu exits
    engine = engines.get(config.engine, config.engine_options)
    # Two links per creating process: one for the engine, one for the proving restore.
    pid, tag = os.getpid(), os.getpid() % 8192
    links: list[netns.Link] = []

    def site_at(name: str, suffix: str, index: int) -> IsolatedSite:
        links.append(netns.create(name, f"fbs{tag}{suffix}", SNAPSHOT_SUBNET, index))
        return IsolatedSite(links[-1], config.port, sys.stderr.buffer)

    digests = sequence.digest_cache(config.store)
    try:
        site = site_at(f"fb-snap-{pid}", "e", 2 * tag)
        spec = sequence.BootSpec(
            engine=engine,
            model=config.model,
            engine_argv=site.engine_argv(config.engine_argv),
            hooks=config.hooks,
            ready_timeout_s=config.ready_timeout_s,
            restore_timeout_s=config.restore_timeout_s,
            cpu_baseline=sequence.checked_baseline(engine, config.cpu_baseline),
        )
        with tempfile.TemporaryDirectory(prefix="fastboot-create-") as run_dir:
            target = isolated_target(spec, site, config.store, digests)
            return sequence.create(
                spec,
                site,
                lambda: site_at(f"fb-snap-{pid}-probe", "p", 2 * tag + 1),
                target,
                Path(run_dir),
            )
    finally:
        try:
            stop_all()
        finally:
            digests.save()
            for link in links:
                netns.delete(link)
