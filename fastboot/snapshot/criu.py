"""Finding and running CRIU.

fastboot needs CRIU >= 4.2 on kernels >= 6.x (facts measured here, see FACTS.md):
criu 3.17 fails with "Unexpected rt vDSO area bounds", and 4.1.1 cannot dump TCP sockets on
kernels >= 6.16 ("Can't get 1:16 opt", SO_PASSCRED). Where the system's criu is older,
`fastboot install-criu` puts Debian unstable's criu with its own loader and libraries in a private
prefix (the system libc is never replaced); this module finds it there.

Search order: $FASTBOOT_CRIU, then `criu` on PATH if new enough, then the private prefix.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fastboot import envs
from fastboot.errors import CriuError, CriuMissingError

logger = logging.getLogger(__name__)

MIN_VERSION = (4, 2)
_VERSION_RE = re.compile(r"^Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", re.MULTILINE)
INSTALL_HINT = "run `fastboot install-criu` as root, or set FASTBOOT_CRIU to a criu >= 4.2"


@dataclass(frozen=True)
class Criu:
    """A CRIU executable and the version it reported."""

    path: str
    """The executable (may be fastboot's wrapper around a private prefix)."""
    version: tuple[int, int, int]
    """(major, minor, patch) from `criu --version`."""

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    def check(self, timeout: float = 60.0) -> str:
        """Run `criu check`; returns its output, raises CriuError when the kernel falls short."""
        try:
            result = subprocess.run(
                [self.path, "check"], capture_output=True, text=True, timeout=timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CriuError("check", str(exc)) from exc
        output = (result.stdout + result.stderr).strip()
        if result.returncode != 0:
            lines = [ln for ln in output.splitlines() if "Error" in ln] or output.splitlines()
            raise CriuError("check", lines[-1] if lines else f"exit code {result.returncode}")
        return output


def parse_version(text: str) -> tuple[int, int, int] | None:
    """The version in `criu --version` output ("Version: 4.2.1"), or None."""
    match = _VERSION_RE.search(text)
    if not match:
        return None
    return int(match[1]), int(match[2]), int(match[3] or 0)


def probe(path: str) -> Criu | None:
    """Run `path --version`; a Criu when it answers with a version, else None."""
    try:
        result = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.debug("criu at %s does not run: %s", path, exc)
        return None
    version = parse_version(result.stdout)
    return Criu(path, version) if version else None


def candidates() -> list[str]:
    """Executables to try, in order of preference."""
    found = []
    if override := envs.criu_override():
        return [override]
    if on_path := shutil.which("criu"):
        found.append(on_path)
    private = envs.criu_prefix() / "bin" / "criu"
    if os.access(private, os.X_OK):
        found.append(str(private))
    return found


def find_criu() -> Criu:
    """The CRIU to use: the first candidate that is new enough.

    Raises CriuMissingError naming what was found and how to get a new enough one.
    """
    seen = []
    for path in candidates():
        criu = probe(path)
        if criu is None:
            seen.append(f"{path} (does not run)")
        elif criu.version[:2] < MIN_VERSION:
            seen.append(f"{path} ({criu.version_text}, too old)")
        else:
            return criu
    need = ".".join(map(str, MIN_VERSION))
    found = "; found " + ", ".join(seen) if seen else ""
    raise CriuMissingError(f"fastboot needs criu >= {need}{found}; {INSTALL_HINT}")


def provision_script() -> Path:
    """The shipped script that installs a private CRIU (see its header)."""
    return Path(__file__).with_name("provision-criu.sh")


#: Options for dumping and restoring an engine tree (measured on vLLM's CPU tree):
#: --shell-job: the tree has its own session, but CRIU still sees a controlling-terminal-less
#:   session leader; --tcp-established: the API server's sockets; --ext-unix-sk: ZMQ ipc://
#:   sockets whose peers may be outside a partially dumped tree; --file-locks: torch/vLLM locks;
#: --link-remap: multiprocessing semaphores are unlinked /dev/shm files that stay mapped.
TREE_OPTIONS = ("--shell-job", "--tcp-established", "--ext-unix-sk", "--file-locks", "--link-remap")


def _run_criu(
    criu: Criu,
    operation: str,
    argv: list[str],
    images: Path,
    workdir: Path,
    pass_fds: tuple[int, ...] = (),
    timeout: float = 600,
) -> None:
    """Run one CRIU operation. Logs and stats go to workdir, never into the images: a published
    snapshot is immutable (its manifest lists every file), and restores may run concurrently."""
    log = workdir / f"{operation}.log"
    command = [
        criu.path,
        operation,
        "--images-dir",
        str(images),
        "--work-dir",
        str(workdir),
        "--log-file",
        str(log),
        "-v4",
        *TREE_OPTIONS,
        *argv,
    ]
    logger.debug("running %s", " ".join(command))
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            pass_fds=pass_fds,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CriuError(operation, str(exc), log) from exc
    if result.returncode != 0:
        raise CriuError(operation, _first_error(log, result.stderr), log)


def _first_error(log: Path, stderr: str) -> str:
    """CRIU's most telling line: the first Error that is not the harmless rlimit warning."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        lines = stderr.splitlines()
    errors = [ln for ln in lines if "Error" in ln and "RLIMIT_NOFILE" not in ln]
    return (errors or lines or ["no output"])[0].strip()


def dump(
    criu: Criu,
    tree_pid: int,
    images: Path,
    workdir: Path,
    extra: tuple[str, ...] = (),
) -> None:
    """Dump the tree rooted at tree_pid into images; the tree is killed when the dump succeeds
    (on failure CRIU resumes it). Not --leave-running: with it CRIU removes the link-remap files
    that a restore needs."""
    images.mkdir(parents=True, exist_ok=True, mode=0o700)
    argv = ["--tree", str(tree_pid), *extra]
    _run_criu(criu, "dump", argv, images, workdir)


def restore(
    criu: Criu,
    images: Path,
    workdir: Path,
    stdio_pipe: str,
    stdio_fd: int,
    extra: tuple[str, ...] = (),
    pass_fds: tuple[int, ...] = (),
) -> int:
    """Restore detached; the engine's stdout/stderr pipe is replaced by stdio_fd (the write end of
    a new pipe). Returns the restored root's pid (a child of the nearest subreaper)."""
    pidfile = workdir / "restored.pid"
    argv = ["--restore-detached", "--pidfile", str(pidfile)]
    argv += ["--inherit-fd", f"fd[{stdio_fd}]:{stdio_pipe}", *extra]
    fds = (stdio_fd, *pass_fds)
    _run_criu(criu, "restore", argv, images, workdir, pass_fds=fds)
    return int(pidfile.read_text().strip())
