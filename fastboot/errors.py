"""Every error fastboot raises on purpose: one tree, rooted at FastbootError.

The classes here are the ones callers across packages handle; a package may define its own
(in the module named on the right), always below one of these.

    FastbootError                 base: the message says what happened and what to do next
    ├── UsageError                a command line or argument that cannot work
    │   └── ConfigError           a configuration file that cannot work (file, key, what to fix)
    ├── DependencyError           a tool, package or kernel feature this host lacks
    │   └── CriuMissingError      no CRIU >= 4.2 could be found
    ├── HostError                 the cloud buffer: a host or host pool cannot do what was asked
    │   ├── IllegalTransitionError  a host lifecycle move that the state machine forbids
    │   └── NoHostAvailableError  no healthy host could be assigned in time
    ├── CriuError                 a CRIU command failed (operation, log path, CRIU's own words)
    ├── AgentError                a per-host agent refused or failed a request (router -> agent)
    ├── ImageFSError              an image store, index, mount or remote problem (fastboot image)
    │   ├── ImageNotFoundError    no image of that name in the store (or on the remote)
    │   ├── ImageCorruptError     a malformed or truncated index, or bytes that fail their digest
    │   ├── MountError            a mountpoint that is busy or missing, a daemon that did not start
    │   ├── RemoteError           the remote store did not answer, or answered wrongly
    │   └── ChunkUnavailable      no tier could supply a chunk            fastboot.imagefs.tiers
    ├── GpuError                  a CUDA checkpoint step failed (pid, step, the driver's code)
    │   ├── SnapshotAbandonedError  lock/checkpoint failed before the dump; the engine runs on
    │   ├── GpuRestoreError       a restored process did not get its GPU state back: cold boot
    │   └── DriverCallError       one driver call's CUresult (internal)  fastboot.gpu.checkpoint
    ├── EngineError               the engine did not start, answer, or reproduce its oracle
    │                                                                     fastboot.engines.base
    ├── SnapshotInvalid           a snapshot that must not be restored    fastboot.snapshot.store
    ├── NetworkError              a namespace, veth or address could not be set up
    │                                                                     fastboot.host.netns
    ├── NotFound, Conflict        the agent's 404 and 409                 fastboot.agent.replicas
    ├── QueueFull, QueueTimeout   a model's request queue: 429, 503       fastboot.router.queue
    └── (private) _Retry          fastboot.router.app, _Refused in fastboot.buffer.health

    Stop (BaseException)          SIGINT/SIGTERM as an exception          fastboot.host.signals
                                  not a FastbootError on purpose: like KeyboardInterrupt it must
                                  pass every `except FastbootError` and unwind to the run's
                                  `finally`, which stops every engine

Foreign exceptions (OSError, subprocess errors) are translated into these at exactly one
boundary, with `raise ... from exc`, so callers handle one tree. tests/unit/test_structure.py
checks that every exception class in fastboot is listed here and derives from FastbootError.
"""

from __future__ import annotations

from pathlib import Path


class FastbootError(Exception):
    """Base of every error fastboot raises on purpose."""


class UsageError(FastbootError):
    """A command line or argument that cannot work as given."""


class DependencyError(FastbootError):
    """A tool, Python package or kernel feature that this host lacks."""


class CriuMissingError(DependencyError):
    """No usable CRIU (>= the minimum version) was found."""


class CriuError(FastbootError):
    """A CRIU operation failed.

    Carries the operation ("dump", "restore", "check"), the CRIU log (if any) and the most telling
    line CRIU wrote, so the message can be acted on without opening the log.
    """

    def __init__(self, operation: str, message: str, log_path: Path | None = None) -> None:
        self.operation = operation
        self.criu_message = message
        self.log_path = log_path
        where = f" (log: {log_path})" if log_path else ""
        super().__init__(f"criu {operation} failed: {message}{where}")


class ConfigError(UsageError):
    """A configuration file that cannot work as given; the message names the file and the key."""


class AgentError(FastbootError):
    """A per-host agent refused or failed a request, or could not be reached.

    `status` is the agent's HTTP status (None when it could not be reached at all); `agent` is
    its address, so the message says which host to look at.
    """

    def __init__(self, agent: str, message: str, status: int | None = None) -> None:
        self.agent = agent
        self.status = status
        self.agent_message = message
        code = f" ({status})" if status is not None else ""
        super().__init__(f"agent {agent}{code}: {message}")


class ImageFSError(FastbootError):
    """An image store, index, mount or remote problem (`fastboot image ...`)."""


class ImageNotFoundError(ImageFSError):
    """No image of that name in the local store (or on the remote)."""


class ImageCorruptError(ImageFSError):
    """A malformed or truncated index, or stored bytes that do not match their digest."""


class MountError(ImageFSError):
    """A mountpoint that is busy or missing, or an image daemon that did not start or stop."""


class RemoteError(ImageFSError):
    """The remote image store did not answer, or answered with something unusable."""


class HostError(FastbootError):
    """The cloud buffer: a host, or the pool of hosts, cannot do what was asked."""


class IllegalTransitionError(HostError):
    """A host lifecycle move the state machine forbids (e.g. assigning a quarantined host)."""


class NoHostAvailableError(HostError):
    """No healthy host of the requested type could be assigned before the deadline."""


class GpuError(FastbootError):
    """A CUDA checkpoint step (lock, checkpoint, restore, unlock, state) failed for a process.

    `pid` and `step` say where; `code` is the driver's CUresult name (or the unexpected state),
    so the message can be acted on without a debugger.
    """

    def __init__(
        self, message: str, pid: int | None = None, step: str = "", code: str = ""
    ) -> None:
        self.pid = pid
        self.step = step
        self.code = code
        super().__init__(message)


class SnapshotAbandonedError(GpuError):
    """Lock or checkpoint failed before the dump; all was unlocked again, the engine runs on."""


class GpuRestoreError(GpuError):
    """A restored process did not get its GPU state back; kill the tree and boot cold."""
