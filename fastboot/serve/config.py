"""What `fastboot serve` was asked to do, and the run both layouts share around their boot."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastboot import engines, envs
from fastboot.boot import sequence
from fastboot.host.signals import Stop, already_stopping, captured_signals
from fastboot.host.supervisor import EngineTree, stop_all
from fastboot.snapshot import cpu_levels
from fastboot.snapshot.store import Store

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """What `fastboot serve` was asked to do."""

    model: str
    """MODEL as given (a local directory or a hub name)."""
    engine_argv: list[str]
    """Flags for the engine, verbatim (vLLM's; translated for SGLang)."""
    engine: str = engines.DEFAULT
    """Which engine runs: "vllm", "sglang" or "command" (fastboot.engines)."""
    engine_options: dict[str, Any] = field(default_factory=dict)
    """The adapter's options (fastboot.engines.get; the command engine's CommandOptions)."""
    host: str | None = None
    """--host as given to the engine (read only)."""
    port: int | None = None
    """--port as given to the engine (read only)."""
    snapshot_dir: Path | None = None
    """Where snapshots live (default $FASTBOOT_HOME/snapshots)."""
    snapshot_remote: str | None = None
    """Base URL of a remote image store to restore missing snapshots from, lazily
    (fastboot.imagefs.lazy_snapshots)."""
    snapshot: bool = True
    """False: plain cold boot, no snapshot read or written."""
    refresh: bool = False
    """True: ignore an existing snapshot and make a new one."""
    hooks: str | None = None
    """Module with quiesce/resume hooks (see fastboot.engines.hooks)."""
    ready_timeout_s: float = 900.0
    """How long a cold boot may take to answer."""
    restore_timeout_s: float = sequence.RESTORE_TIMEOUT_S
    """How long a restored engine may take to answer."""
    weights_image: str | None = None
    """Image to take the model from: mounted read-only at a stable path that vLLM gets as its
    MODEL; MODEL stays the name clients use (see fastboot.imagefs.shared)."""
    isolated: bool = False
    """Serve as one replica: the engine in its own network, mount and pid namespaces with the
    snapshot agents restore, published on host/port by a relay (fastboot.serve.isolated)."""
    rpc_dir: Path | None = None
    """Where the engine binds its local sockets (Engine.socket_env; vLLM's default is /tmp,
    where every run left files behind). Set by serve(); see rpc_dir()."""
    model_identity: dict[str, Any] | None = None
    """How the snapshot key names the model when it is not hashed from its files (an image:
    its index digest and mountpoint). Set by serve() for weights_image."""
    env_image: str | None = None
    """Image of a Python virtual environment with the engine to run it from: mounted
    read-only at a stable path, the engine run by its interpreter (see _env_from_image)."""
    engine_python: Path | None = None
    """The interpreter that runs the engine (None: the engine beside fastboot). Set by serve()
    for env_image."""
    environment: dict[str, Any] | None = None
    """The env image in the snapshot key (index digest and mountpoint). Set by serve()."""
    cpu_baseline: str = cpu_levels.NATIVE
    """The x86-64 level the engine's code is held to (fastboot.snapshot.cpu_levels)."""

    @property
    def store(self) -> Store:
        return Store(self.snapshot_dir or envs.snapshot_dir())

    @property
    def url(self) -> str:
        return engines.base_url(self.host, self.port)

    def boot_spec(self, engine_argv: list[str]) -> sequence.BootSpec:
        """The boot sequence's view of this config, with the engine's flags as it runs them."""
        return sequence.BootSpec(
            engine=engines.get(self.engine, self.engine_options),
            model=self.model,
            engine_argv=engine_argv,
            python=self.engine_python,
            hooks=self.hooks,
            ready_timeout_s=self.ready_timeout_s,
            restore_timeout_s=self.restore_timeout_s,
            cpu_baseline=self.cpu_baseline,
        )


def run_until_stopped(boot: Callable[[Path], EngineTree], clean_up: Callable[[], None]) -> int:
    """Serve the engine boot(run_dir) returns until it exits or SIGINT/SIGTERM arrives; the
    exit code. Whatever phase was interrupted (cold boot, warm-up, dump, restore, serving),
    every engine tree this run started is stopped, then clean_up() runs; a second Ctrl-C must
    not cut that short."""
    with captured_signals(), tempfile.TemporaryDirectory(prefix="fastboot-run-") as run_dir:
        try:
            tree = boot(Path(run_dir))
            code = tree.wait()
            logger.info("engine exited with %s", code)
            return 0 if code in (0, None) else 1
        except Stop as stop:
            logger.info("%s: stopping the engine", stop)
            return 0
        finally:
            with captured_signals(already_stopping):
                stop_all()
                clean_up()
