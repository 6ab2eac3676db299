"""Where an engine runs: the one thing the boot sequence is parameterised by.

    HostSite       pid 1 of its own pid namespace on the host's network, listening where the
                   user said (`fastboot serve`)
    IsolatedSite   in its own network, mount and pid namespaces, listening on 0.0.0.0:PORT
                   inside, reached at the namespace's address (replicas, `fastboot snapshot
                   create`, `fastboot serve --fastboot-isolated`)

A site says how to spawn the engine, how to restore a snapshot into it, and where to reach it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from fastboot.host.netns import Link
from fastboot.host.supervisor import EngineTree, stdout_sink
from fastboot.snapshot.restore import restore_host, restore_isolated
from fastboot.snapshot.store import Manifest


class Site(Protocol):
    """Where the engine runs (see the module doc)."""

    @property
    def url(self) -> str:
        """The engine's base URL, as fastboot reaches it."""
        ...

    @property
    def layout(self) -> str | None:
        """The snapshot key's layout: None (host) or "isolated"."""
        ...

    @property
    def isolation(self) -> dict[str, Any] | None:
        """What the manifest records of the layout (Manifest.isolation)."""
        ...

    @property
    def socket_dir(self) -> Path | None:
        """Where the engine binds its local sockets (None: where it likes)."""
        ...

    def engine_argv(self, argv: list[str]) -> list[str]:
        """The user's engine flags as the engine runs them here."""
        ...

    def spawn(self, argv: list[str], env: dict[str, str]) -> EngineTree:
        """Start the engine (argv from the adapter) with env."""
        ...

    def restore(
        self, snapshot: Path, manifest: Manifest, run_dir: Path, from_mount: bool = False
    ) -> EngineTree:
        """Restore the snapshot at path snapshot here (no readiness check); from_mount: it is a
        lazily mounted remote snapshot, kept mounted while the engine lives (pages mapped)."""
        ...


@dataclass(frozen=True)
class HostSite:
    """The engine on the host's network (`fastboot serve`)."""

    url: str
    rpc_dir: Path | None = None
    """The engine's socket directory: the same path whenever a snapshot taken there is
    restored (CRIU re-binds the sockets where they were), emptied before every boot."""
    sink: BinaryIO = field(default_factory=stdout_sink)
    layout: str | None = None
    isolation: dict[str, Any] | None = None

    @property
    def socket_dir(self) -> Path | None:
        return self.rpc_dir

    def engine_argv(self, argv: list[str]) -> list[str]:
        return list(argv)

    def spawn(self, argv: list[str], env: dict[str, str]) -> EngineTree:
        self._fresh_rpc_dir()
        return EngineTree.spawn(argv, env, self.sink)

    def restore(
        self, snapshot: Path, manifest: Manifest, run_dir: Path, from_mount: bool = False
    ) -> EngineTree:
        self._fresh_rpc_dir()  # the sockets are re-bound here, as they were at the dump
        return restore_host(snapshot, manifest, run_dir, self.sink, from_mount)

    def _fresh_rpc_dir(self) -> None:
        if self.rpc_dir is not None:
            shutil.rmtree(self.rpc_dir, ignore_errors=True)
            self.rpc_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.rpc_dir.mkdir(mode=0o700)


#: The port an isolated engine listens on inside its namespace (every replica: the same).
INNER_PORT = 8000


@dataclass(frozen=True)
class IsolatedSite:
    """The engine in link's network namespace (and mount and pid namespaces of its own)."""

    link: Link
    port: int = INNER_PORT
    sink: BinaryIO = field(default_factory=stdout_sink)
    layout: str | None = "isolated"

    @property
    def url(self) -> str:
        return f"http://{self.link.ip}:{self.port}"

    @property
    def isolation(self) -> dict[str, Any] | None:
        return {"port": self.port}

    @property
    def socket_dir(self) -> Path | None:
        # The engine's /dev/shm is its own tmpfs, saved and restored with it: sockets there
        # are private to each replica (in /tmp the second restore could not bind them).
        return Path("/dev/shm")

    def engine_argv(self, argv: list[str]) -> list[str]:
        """fastboot's --host/--port go last, so one snapshot serves every replica; last before
        a `--`, where the flags after it are a server command's own (the command engine)."""
        at = argv.index("--") if "--" in argv else len(argv)
        return [*argv[:at], "--host", "0.0.0.0", "--port", str(self.port), *argv[at:]]

    def spawn(self, argv: list[str], env: dict[str, str]) -> EngineTree:
        return EngineTree.spawn(argv, env, self.sink, self.link.netns)

    def restore(
        self, snapshot: Path, manifest: Manifest, run_dir: Path, from_mount: bool = False
    ) -> EngineTree:
        return restore_isolated(snapshot, manifest, self.link.netns, run_dir, self.sink, from_mount)
